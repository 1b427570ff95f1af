"""What the plan resolves and checks before distributed init: the device and dtype, the sequence
length against the model, an Accelerate launch whose engine the trainer would not use."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch
import transformers

from tests.helpers import subprocess_env
from ulysses_sp.core.backends.flash import check_installed
from ulysses_sp.integrations.accelerate_env import launched_deepspeed_config_file
from ulysses_sp.train.config import TrainConfig
from ulysses_sp.train.plan import (
    TORCH_DTYPES,
    check_accelerate_launch,
    check_device_dtype,
    check_liger_ops,
    check_ring,
    check_seq_len,
    make_plan,
    read_training_documents,
)
from ulysses_sp.train.presets import build_config, model_source

OURS = {
    "ACCELERATE_USE_PARALLELISM_CONFIG": "true",
    "PARALLELISM_CONFIG_SP_SIZE": "2",
    "PARALLELISM_CONFIG_SP_BACKEND": "ulysses_sp",
    "PARALLELISM_CONFIG_DP_SHARD_SIZE": "1",
}


def test_device_and_dtype(monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"--device cuda was given but no CUDA device is visible.*--device cpu"):
            check_device_dtype("cuda", torch.float32)
    with pytest.raises(ValueError, match=r"--dtype fp16 is not supported on CPU.*use --dtype fp32 or bf16"):
        check_device_dtype("cpu", torch.float16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100-SXM2-32GB")
    with pytest.raises(ValueError, match=r"--dtype bf16 needs a GPU with bfloat16 support.*Tesla V100.*--dtype fp16"):
        check_device_dtype("cuda", torch.bfloat16)
    check_device_dtype("cuda", torch.float16)


def test_liger_ops_needs_cuda_and_liger(monkeypatch):
    with pytest.raises(ValueError, match=r"--liger-ops runs liger-kernel's triton kernels, which need CUDA; on cpu"):
        check_liger_ops("cpu")
    for name in ("liger_kernel.ops.rms_norm", "liger_kernel.ops.rope", "liger_kernel.ops.swiglu"):
        monkeypatch.setitem(sys.modules, name, None)  # as without liger-kernel or triton
    with pytest.raises(ValueError, match=r"need liger-kernel with triton .* pip install 'ulysses_sp\[liger\]'"):
        check_liger_ops("cuda")


def test_sequence_longer_than_max_positions():
    rope = build_config("tiny-llama", max_position_embeddings=64)
    check_seq_len(rope, 64, allow_longer=False)
    with pytest.raises(
        ValueError,
        match=r"--seq-len 65 exceeds max_position_embeddings=64 of LlamaConfig; use "
        r"--seq-len <= 64, or pass --allow-longer-than-max-positions",
    ):
        check_seq_len(rope, 65, allow_longer=False)
    with pytest.warns(UserWarning, match="RoPE positions past the model's trained range"):
        check_seq_len(rope, 65, allow_longer=True)
    absolute = transformers.GPT2Config(n_positions=32, n_embd=16, n_layer=1, n_head=2, vocab_size=256)
    with pytest.raises(
        ValueError,
        match=r"--seq-len 40 exceeds max_position_embeddings=32 of GPT2Config, which has "
        r"learned absolute position embeddings",
    ):
        check_seq_len(absolute, 40, allow_longer=True)


def test_accelerate_launches_the_trainer_cannot_honour():
    ds_launch = {**OURS, "ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": "z2.json"}
    assert launched_deepspeed_config_file(ds_launch) == "z2.json"  # the trainer loads it as --deepspeed
    assert launched_deepspeed_config_file(OURS) is None
    check_accelerate_launch({"zero_optimization": {"stage": 2}}, ds_launch)
    inline = {**OURS, "ACCELERATE_USE_DEEPSPEED": "true"}  # DeepSpeed settings in the YAML, no JSON file
    with pytest.raises(
        ValueError,
        match=r"accelerate launched DeepSpeed \(deepspeed_config_file \(set in the "
        r"Accelerate config's deepspeed_config\)\).*add --deepspeed CONFIG.json",
    ):
        check_accelerate_launch({}, inline)
    fsdp_launch = {**OURS, "ACCELERATE_USE_FSDP": "true"}
    with pytest.raises(
        ValueError, match="accelerate launched FSDP; launch/train.py trains with its FSDP2 engine only "
    ):
        check_accelerate_launch({}, fsdp_launch)
    check_accelerate_launch({}, fsdp_launch, fsdp=True)  # --fsdp: the FSDP2 engine shards the model itself


def test_model_is_the_file_given(tmp_path):
    """--model x.json reads that file, not its directory's config.json; a directory reads its config.json."""
    transformers.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4).to_json_file(
        tmp_path / "config.json"
    )
    qwen = transformers.Qwen2Config(num_hidden_layers=7, hidden_size=32, num_attention_heads=4, num_key_value_heads=2)
    qwen.to_json_file(tmp_path / "my-qwen.json")
    chosen = build_config(str(tmp_path / "my-qwen.json"))
    assert (type(chosen).__name__, chosen.num_hidden_layers) == ("Qwen2Config", 7)
    assert type(build_config(str(tmp_path))).__name__ == "LlamaConfig"
    assert model_source("tiny-llama") == "tiny-llama" and model_source(str(tmp_path)) == str(tmp_path / "config.json")


@pytest.mark.parametrize(
    "name, match",
    [
        (
            "meta-llama/Llama-3.1-8B",
            r"looks like a hub model id, and ulysses_sp downloads nothing: download it first "
            r"\(huggingface-cli download meta-llama/Llama-3.1-8B --local-dir DIR\)",
        ),
        ("nowhere.json", r"'nowhere.json' is neither a preset nor a file or directory on disk"),
        ("{tmp}", r"the directory '.*' has no config.json"),
        ("{tmp}/no_type.json", r"the file has no model_type; is it a transformers config.json\?"),
        ("{tmp}/encoder.json", r"model_type 'distilbert' \(DistilBertConfig\) has no causal-LM class"),
    ],
)
def test_model_errors(tmp_path, name, match):
    (tmp_path / "no_type.json").write_text('{"hidden_size": 8}')
    (tmp_path / "encoder.json").write_text('{"model_type": "distilbert"}')
    with pytest.raises(ValueError, match=match):
        build_config(name.replace("{tmp}", str(tmp_path)))


def test_dataset_must_exist_and_hold_a_document_of_two_tokens(tmp_path):
    with pytest.raises(ValueError, match=r"--dataset .*missing.txt: dataset path .* does not exist"):
        read_training_documents(str(tmp_path / "missing.txt"))
    short = tmp_path / "short.txt"
    short.write_text("a\n\nb\n\nc")
    with pytest.raises(ValueError, match=r"every one of its 3 documents is 1 token long; a document needs at least 2"):
        read_training_documents(str(short))
    assert len(read_training_documents(None)) > 10  # the bundled corpus


def test_the_plan_checks_files_before_importing_transformers(tmp_path):
    """A wrong path fails without transformers (or DeepSpeed) being imported: in seconds."""
    code = (
        "import sys\nfrom ulysses_sp.train.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
        "    print('exit', e.code, [m for m in ('transformers', 'deepspeed') if m in sys.modules])\n"
    )
    for argv in (["--steps", "0"], ["--model", "org/model"], ["--dataset", str(tmp_path / "none.txt")]):
        out = subprocess.run(
            [sys.executable, "-c", code, *argv],
            capture_output=True,
            text=True,
            timeout=120,
            env=subprocess_env(),
            check=True,
        )
        assert out.stdout.strip() == "exit 2 []", (argv, out.stdout, out.stderr)
        assert out.stderr.count("ulysses_sp: ") == 1 and "Traceback" not in out.stderr, out.stderr


def test_torch_dtype_names_and_the_flash_check():
    assert TORCH_DTYPES["bfloat16"] is TORCH_DTYPES["bf16"] is torch.bfloat16
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ValueError, match=r"attn_implementation='flash_attention_2' needs the flash-attn package"):
            check_installed("flash_attention_2")


def test_ring_size_from_every_source_and_checks(monkeypatch, tmp_path):
    """The plan's ring size: --ring-size, the DeepSpeed JSON's sequence_parallel_ring_size or the
    Accelerate config's cp_size (one rule for every entry point, unit/integrations/test_accelerate_config.py);
    explicit sizes checked against the heads and the kernel before any process group."""
    heads8 = build_config("tiny-llama-gqa")  # 8 query heads
    for key in ("LOCAL_WORLD_SIZE", "ULYSSES_SP_SIZE", "ULYSSES_SP_RING_SIZE"):
        monkeypatch.setenv(key, "")  # empty = unset; recorded, so what claim_sp_size writes is undone
    monkeypatch.delenv("PARALLELISM_CONFIG_SP_BACKEND", raising=False)
    model = tmp_path / "qwen3_2h.json"
    build_config("tiny-qwen3", num_attention_heads=2, num_key_value_heads=1).to_json_file(model)
    plan = lambda **kw: make_plan(TrainConfig(device="cpu", model=str(model), **kw))  # noqa: E731
    assert (plan(sp_size=4, ring_size="auto").ring_size, plan(sp_size=4, ring_size="4").ring_size) == (2, 4)
    assert plan(sp_size=2).ring_size == 1
    ds = tmp_path / "ds.json"
    ds.write_text(
        '{"train_micro_batch_size_per_gpu": 1, "sequence_parallel_size": 4, "sequence_parallel_ring_size": "auto"}'
    )
    assert (plan(deepspeed=str(ds)).sp_size, plan(deepspeed=str(ds)).ring_size) == (4, 2)
    with pytest.raises(
        ValueError, match=r"--ring-size 4 disagrees with .*sequence_parallel_ring_size\": auto \(= 2\) in the DeepSpeed"
    ):
        plan(deepspeed=str(ds), ring_size="4")
    for key, value in {**OURS, "PARALLELISM_CONFIG_CP_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    assert (plan().sp_size, plan().ring_size) == (4, 2)  # Ulysses 2 x ring 2 from the Accelerate config
    for attn in ("sdpa", "eager", "flex_attention", "flash_attention_2"):  # the kernels with a ring block kernel
        check_ring(2, 4, heads8, attn)
    with pytest.raises(ValueError, match="leaves 16 Ulysses ranks for 8 attention heads; use --ring-size 4"):
        check_ring(2, 32, heads8, "sdpa")
    with pytest.raises(ValueError, match="not 'flash_attention_3'"):
        check_ring(2, 4, heads8, "flash_attention_3")
    with pytest.raises(ValueError, match="--ring-size must be an integer >= 1 or auto, got '0'"):
        TrainConfig(ring_size="0")
