"""SPSFTTrainer against TRL's stock SFTTrainer on one process, same global batch, fp32: every logged
training loss, grad norm, eval loss and SFTTrainer's own metrics (``entropy``,
``mean_token_accuracy``, ``num_tokens``, training and eval) equal within 1e-5 relative.

Data: prompt-completion pairs of the bundled corpus with examples/sft_trl.py's byte tokenizer,
packed by SFTTrainer (``packing=True``: best-fit decreasing, about 3 pairs per 512-token row;
padding-free: a micro-batch is one flattened row, positions restarting at every pair, padded to a
multiple of P when its length is odd). Gradient accumulation 2, clipping, warmup + linear schedule,
evaluation every 2 steps and a final ``evaluate()``.

* sp2 as hybrid SP, a ring of 2 ((u, r) = (1, 2): the packed rows on the ring's load-balanced
  layout), with ``completion_only_loss`` (prompts masked) and a partial last eval batch;
* dp2 x sp2 with LoRA adapters (SFTTrainer's ``peft_config``; 4 processes, against one process
  whose batch holds both DP replicas' rows) on the full sequences, evaluated on unpacked pairs whose
  count dp divides (Accelerate's even-batch padding would otherwise repeat rows on one side only);
* refusals (``loss_type="dft"``, the MoE aux loss) raise before the SP process group exists;
* examples/sft_trl.py under torchrun at sp2 logs what it logs in one process with the stock trainer.
"""

from __future__ import annotations

import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.distributed import harness
from tests.helpers import ROOT, flags, launcher_command, run_ok, tiny_model

pytestmark = pytest.mark.slow

STEPS = 4
#: log_history keys that are timings (or count padding FLOPs), not results
_NOT_COMPARED = ("_runtime", "_per_second", "total_flos")


def _sft_run(
    ctx,
    sp_size: int | None,
    batch: int,
    completion_only: bool,
    eval_rows: int,
    out_path: str,
    lora: bool = False,
    ring_size: int = 1,
) -> None:
    """Train and evaluate with SPSFTTrainer (``sp_size``) or the stock SFTTrainer (None); rank 0
    writes the log history to ``out_path``. ``batch``: rows per device (train and eval); ``lora``:
    SFTTrainer wraps the model with LoRA adapters (``peft_config``), the same on every rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    from trl import SFTConfig, SFTTrainer

    from examples.sft_trl import byte_tokenizer, sentence_pairs
    from ulysses_sp.integrations.trl import SPSFTTrainer

    pairs = sentence_pairs()
    args = SFTConfig(
        output_dir=os.path.join(os.path.dirname(out_path), f"run{sp_size}"),
        use_cpu=True,
        bf16=False,  # SFTConfig's default is True, which autocasts to bf16 even on CPU
        report_to=[],
        max_length=512,
        packing=True,  # bfd, padding-free
        eval_packing=eval_rows == 0,  # eval_rows > 0: that many unpacked pairs, one per row
        completion_only_loss=completion_only,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=2,
        per_device_eval_batch_size=batch,
        max_steps=STEPS,
        learning_rate=3e-3,
        warmup_steps=1,
        max_grad_norm=1.0,
        seed=5,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="no",
        disable_tqdm=True,
    )
    common = {
        "model": tiny_model("tiny-llama", seed=3),
        "args": args,
        "train_dataset": pairs.select(range(0, 160)),
        "eval_dataset": pairs.select(range(160, 160 + (eval_rows or 20))),
        "processing_class": byte_tokenizer(),
    }
    if lora:
        from peft import LoraConfig

        common["peft_config"] = LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"])
    trainer = SFTTrainer(**common) if sp_size is None else SPSFTTrainer(**common, sp_size=sp_size, ring_size=ring_size)
    assert sp_size is None or trainer.sp_topology.ring_size == ring_size
    trainer.train()
    trainer.evaluate()
    if ctx.rank == 0:
        with open(out_path, "w") as f:
            json.dump(trainer.state.log_history, f)


def _close(a: float, b: float, what: str) -> None:
    assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-9), f"{what}: SP {a} vs stock {b}"


def _compare_histories(sp: list[dict], ref: list[dict], what: str) -> None:
    """Every logged value of ``sp`` equals ``ref``'s, entry by entry (timings aside)."""
    assert len(sp) == len(ref), f"{what}: {len(sp)} log entries vs {len(ref)}"
    for i, (got, want) in enumerate(zip(sp, ref)):
        keys = sorted(k for k in want if not k.endswith(_NOT_COMPARED))
        assert sorted(k for k in got if not k.endswith(_NOT_COMPARED)) == keys, f"{what} entry {i}: {got} vs {want}"
        for key in keys:
            _close(float(got[key]), float(want[key]), f"{what} entry {i} (step {want['step']}) {key}")


def _run_pair(
    tmp_path, world: int, sp_size: int, batch: int, completion_only: bool, eval_rows: int, lora=False, ring_size=1
):
    """The SP run on ``world`` processes (``batch`` rows per device) and the stock one on one process
    with the same global batch; returns their log histories (SP, stock). One after the other: on 2
    cores, overlapping them makes the SP run's collectives wait on the other job's processes."""
    ref_path, sp_path = tmp_path / "ref.json", tmp_path / "sp.json"
    harness.run(_sft_run, 1, None, batch * world // sp_size, completion_only, eval_rows, str(ref_path), lora)
    harness.run(_sft_run, world, sp_size, batch, completion_only, eval_rows, str(sp_path), lora, ring_size)
    return json.loads(sp_path.read_text()), json.loads(ref_path.read_text())


def _check_run(sp: list[dict], ref: list[dict], what: str) -> None:
    _compare_histories(sp, ref, what)
    train = [h for h in ref if "loss" in h]
    assert len(train) == STEPS and all("entropy" in h and "mean_token_accuracy" in h for h in train), ref
    assert [h["step"] for h in ref if "eval_loss" in h] == [2, 4, 4], ref  # steps 2, 4 and evaluate()
    assert all("eval_entropy" in h for h in ref if "eval_loss" in h), ref
    assert train[-1]["loss"] < train[0]["loss"], "the run did not train"


def test_sp2_ring2_completion_only_matches_stock_sft_trainer(tmp_path):
    sp, ref = _run_pair(tmp_path, world=2, sp_size=2, batch=2, completion_only=True, eval_rows=0, ring_size=2)
    _check_run(sp, ref, "sp2 as a ring of 2")


def test_dp2_sp2_lora_matches_stock_sft_trainer(tmp_path):
    """dp2 x sp2 with LoRA adapters (SFTTrainer's peft_config): only the adapters train."""
    sp, ref = _run_pair(tmp_path, world=4, sp_size=2, batch=2, completion_only=False, eval_rows=8, lora=True)
    _check_run(sp, ref, "dp2 x sp2, LoRA")


def test_refusals_before_the_sp_group(tmp_path, monkeypatch):
    """SFTTrainer settings the sharded loss cannot honour: one ValueError naming each, raised before
    ulysses_sp creates a process group or an SP topology (so before any collective of its own)."""
    from trl import SFTConfig

    from examples.sft_trl import byte_tokenizer, sentence_pairs
    from ulysses_sp.integrations import hf_trainer
    from ulysses_sp.integrations.trl import SPSFTTrainer

    def no_collectives(*args, **kwargs):
        raise AssertionError("the refusal must come before the SP process group is set up")

    monkeypatch.setattr(hf_trainer, "ensure_process_group", no_collectives)
    monkeypatch.setattr(hf_trainer, "init_sp", no_collectives)
    pairs = sentence_pairs().select(range(8))

    def build(model, **config):
        args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], max_length=256, **config)
        return SPSFTTrainer(model=model, args=args, train_dataset=pairs, processing_class=byte_tokenizer(), sp_size=1)

    with pytest.raises(
        ValueError, match=r"SPSFTTrainer does not support: .*label_smoothing_factor=0\.1.*loss_type='dft'"
    ):
        build(tiny_model("tiny-llama"), loss_type="dft", label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match=r"MoE load-balancing loss \(router_aux_loss_coef=0\.5\).*=0\.0\)"):
        build(tiny_model("tiny-gpt-oss", attn="eager"), router_aux_loss_coef=0.5)


def test_sft_example_matches_one_process(tmp_path):
    """examples/sft_trl.py under torchrun at sp2 logs what the same script logs with the stock
    SFTTrainer in one process: losses, grad norms, entropy, token accuracy, token counts, eval."""
    example = os.path.join(ROOT, "examples", "sft_trl.py")
    commands = {
        "sp2": launcher_command("torchrun", 2, example, *flags(sp_size=2, steps=4, out=tmp_path / "sp2")),
        "one": [sys.executable, example, *flags(sp_size=1, steps=4, out=tmp_path / "one")],
    }
    with ThreadPoolExecutor(2) as pool:  # 3 processes on 2 cores: overlapping their start-up pays
        for job in [pool.submit(run_ok, cmd, cwd=tmp_path) for cmd in commands.values()]:
            job.result()
    runs = {name: json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"] for name in commands}
    _compare_histories(runs["sp2"], runs["one"], "example")
    assert any("eval_entropy" in h for h in runs["one"]) and any("num_tokens" in h for h in runs["one"]), runs
