"""SPTrainer (2 processes, sp2) against the stock transformers.Trainer (1 process) on the same global
batch, fp32: every logged training loss, the eval losses (mid-training and final, computed under
SP) and the final train_loss equal within 1e-4 relative. Variable-length rows (padding to a
multiple of 2 and -100 labels), gradient accumulation 2, clipping and a linear LR schedule as the
Trainer does them; evaluation with a batch size that leaves a partial last batch. Under FSDP2 the SP
run is hybrid SP (``ring_size=2``: (u, r) = (1, 2)) and its step-2 checkpoint resumes at another
layout, Ulysses alone ((u, r) = (2, 1))."""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from torch.utils.data import Subset

from tests.distributed import harness
from tests.helpers import ROOT, flags, free_port, launcher_command, run_ok, tiny_model

pytestmark = pytest.mark.slow

STEPS = 4
TRAINER_ZERO3 = os.path.join(ROOT, "configs", "deepspeed", "trainer_zero3.json")


def _train_and_evaluate(ctx, sp_size: int | None, out_path: str, engine: str = "ddp", ring_size: int = 1) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", OMP_NUM_THREADS="1")
    if engine == "fsdp2":  # what `accelerate launch --config_file configs/accelerate/fsdp2_sp2.yaml` sets
        os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", FSDP_RESHARD_AFTER_FORWARD="true")
    from transformers import Trainer, TrainingArguments

    from ulysses_sp.data.collate import collate_padded
    from ulysses_sp.data.text import load_text_dataset
    from ulysses_sp.integrations.hf_trainer import SPTrainer

    rows = load_text_dataset(None, 40, pack=False)  # one row per document piece, 1..40 tokens
    train, evaluation = Subset(rows, range(64)), Subset(rows, range(64, 71))  # 7 rows: batches 3, 3, 1
    # before TrainingArguments: with a ZeRO-3 config those make from_config partition the model at once
    model = tiny_model("tiny-llama", seed=3)
    ds_json = None
    if engine == "deepspeed":
        with open(TRAINER_ZERO3) as f:
            ds_json = json.load(f)
        if sp_size is not None:  # SPTrainer reads its SP size from the JSON (and takes the key out)
            ds_json["sequence_parallel_size"] = sp_size
    args = TrainingArguments(
        output_dir=os.path.join(os.path.dirname(out_path), f"run{sp_size}"),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        per_device_eval_batch_size=3,
        max_steps=STEPS,
        learning_rate=3e-3,
        warmup_steps=1,
        max_grad_norm=1.0,
        seed=5,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="steps" if engine == "fsdp2" else "no",
        save_steps=2,
        deepspeed=ds_json,
        disable_tqdm=True,
    )
    common = {
        "model": model,
        "args": args,
        "train_dataset": train,
        "eval_dataset": evaluation,
        "data_collator": collate_padded,
    }
    explicit = {} if engine == "deepspeed" else {"sp_size": sp_size}
    trainer = Trainer(**common) if sp_size is None else SPTrainer(**common, **explicit, ring_size=ring_size)
    if sp_size is not None:
        assert (trainer.sp_topology.sp_size, trainer.sp_topology.ring_size) == (sp_size, ring_size)
    trainer.train()
    final = trainer.evaluate()
    if engine != "ddp":
        _assert_engine_ran(trainer, engine)
    resumed = None
    if engine == "fsdp2":  # the step-2 checkpoint (sharded weights + AdamW state) continues the same curve,
        # here at another (ulysses, ring) layout than the one that saved it
        common["model"] = tiny_model("tiny-llama", seed=11)  # other weights: the checkpoint must replace them
        again = SPTrainer(**common, sp_size=sp_size)
        again.train(resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-2"))
        resumed = [h["loss"] for h in again.state.log_history if "loss" in h and h["step"] > 2]
    if ctx.rank == 0:
        history = trainer.state.log_history
        result = {
            "loss": [h["loss"] for h in history if "loss" in h],
            "eval_loss": [h["eval_loss"] for h in history if "eval_loss" in h],
            "train_loss": next(h["train_loss"] for h in history if "train_loss" in h),
            "final_eval_loss": final["eval_loss"],
            "resumed": resumed,
        }
        with open(out_path, "w") as f:
            json.dump(result, f)


def _assert_engine_ran(trainer, engine: str) -> None:
    """The parameters are the engine's (no silent fallback to DDP): DTensor shards under FSDP2,
    ZeRO-3-partitioned under DeepSpeed, and the loss module is what the engine wraps."""
    from ulysses_sp.core import comm
    from ulysses_sp.loss.causal_lm import CausalLMLoss

    params = list(trainer.model.parameters())
    if engine == "fsdp2":
        assert all(comm.is_sharded(p) for p in params), "FSDP2 did not shard every parameter"
        assert trainer.model_wrapped is trainer.sp_loss_root and isinstance(trainer.sp_loss_root, CausalLMLoss)
    else:
        assert all(hasattr(p, "ds_id") for p in params), "ZeRO-3 did not partition every parameter"
        assert type(trainer.model_wrapped).__name__ == "DeepSpeedEngine"
        assert isinstance(trainer.model_wrapped.module, CausalLMLoss)


def _close(a: float, b: float, what: str) -> None:
    assert abs(a - b) <= 1e-4 * abs(b), f"{what}: SP {a} vs non-SP {b}"


@pytest.mark.parametrize(
    "engine, ring_size", [("ddp", 1), ("fsdp2", 2), ("deepspeed", 1)], ids=["ddp", "fsdp2-ring2", "deepspeed"]
)
def test_sp_trainer_matches_stock_trainer(tmp_path, engine, ring_size):
    """SPTrainer at sp2 under DDP, FSDP2 (sharded by SPTrainer, as under fsdp2_sp2.yaml; hybrid SP with
    a ring of 2) and DeepSpeed ZeRO-3 (Accelerate's DeepSpeed plugin, configs/deepspeed/trainer_zero3.json)
    against the stock Trainer on one process; under FSDP2 also a resume from the step-2 checkpoint at
    sp2 without a ring."""
    ref_path, sp_path = tmp_path / "ref.json", tmp_path / "sp.json"
    with ThreadPoolExecutor(2) as pool:  # the two jobs are independent: overlap their start-up
        jobs = [
            pool.submit(harness.run, _train_and_evaluate, 1, None, str(ref_path)),
            pool.submit(harness.run, _train_and_evaluate, 2, 2, str(sp_path), engine, ring_size),
        ]
        for job in jobs:
            job.result()
    ref, sp = (json.loads(p.read_text()) for p in (ref_path, sp_path))
    assert len(ref["loss"]) == len(sp["loss"]) == STEPS
    assert len(ref["eval_loss"]) == len(sp["eval_loss"]) == 3  # steps 2, 4 and the final evaluate()
    for step, (a, b) in enumerate(zip(sp["loss"], ref["loss"]), 1):
        _close(a, b, f"training loss at step {step}")
    for i, (a, b) in enumerate(zip(sp["eval_loss"], ref["eval_loss"])):
        _close(a, b, f"eval loss #{i}")
    _close(sp["train_loss"], ref["train_loss"], "train_loss")
    _close(sp["final_eval_loss"], ref["final_eval_loss"], "final eval_loss")
    assert ref["loss"][-1] < ref["loss"][0], "the run did not train"
    if engine == "fsdp2":
        assert len(sp["resumed"]) == STEPS - 2, sp["resumed"]
        for step, (a, b) in enumerate(zip(sp["resumed"], sp["loss"][2:]), 3):
            _close(a, b, f"resumed training loss at step {step}")


def test_trainer_example_matches_one_process(tmp_path):
    """examples/trainer_sp.py runs under torchrun at sp2 as a ring of 2 (DDP, (u, r) = (1, 2)) and its
    logged losses (training and evaluation) equal the same script's in one process without SP."""
    example = os.path.join(ROOT, "examples", "trainer_sp.py")
    runs = {}
    for name, cmd in (
        ("sp2", launcher_command("torchrun", 2, example, *flags(sp_size=2, ring_size=2, out=tmp_path / "sp2"))),
        ("one", [sys.executable, example, *flags(sp_size=1, out=tmp_path / "one")]),
    ):
        out = run_ok(cmd, cwd=tmp_path)
        assert name == "one" or "(engine ddp, sp 2, ring 2)" in out.stdout, out.stdout[-2000:]
        history = json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
        runs[name] = [(key, h[key]) for h in history for key in ("loss", "eval_loss") if key in h]
    assert [k for k, _ in runs["sp2"]] == [k for k, _ in runs["one"]] and runs["one"], runs
    for (key, got), (_, want) in zip(runs["sp2"], runs["one"]):
        _close(float(got), float(want), f"example {key}")


@pytest.mark.parametrize("yaml_name, engine", [("fsdp2_sp2.yaml", "fsdp2")], ids=["fsdp2"])
def test_trainer_example_under_shipped_yaml_matches_one_process(tmp_path, yaml_name, engine):
    """``accelerate launch --config_file configs/accelerate/<yaml> examples/trainer_sp.py`` (2 CPU
    processes, sp2 from the YAML) trains with that engine and logs the losses of the same script in
    one process without SP. (deepspeed_zero3_sp2.yaml passed the same check by hand, 129 s on 2
    cores, left out of CI for time: ZeRO-3 under the Trainer is tested above through
    TrainingArguments(deepspeed=...), the YAML's SP size by unit/integrations/test_accelerate_config.py.)"""
    example = os.path.join(ROOT, "examples", "trainer_sp.py")
    yaml = os.path.join("configs", "accelerate", yaml_name)  # the DeepSpeed YAML names its JSON relative to the root
    launch = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file", yaml]
    launch += ["--main_process_port", str(free_port())]
    runs = {}
    with ThreadPoolExecutor(2) as pool:
        jobs = {
            "sp2": pool.submit(run_ok, [*launch, example, *flags(steps=4, out=tmp_path / "sp2")], cwd=ROOT),
            "one": pool.submit(run_ok, [sys.executable, example, *flags(sp_size=1, steps=4, out=tmp_path / "one")]),
        }
        outputs = {name: job.result() for name, job in jobs.items()}
    assert f"(engine {engine}, sp 2, ring 1)" in outputs["sp2"].stdout, outputs["sp2"].stdout[-2000:]
    for name in jobs:
        history = json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
        runs[name] = [(key, h[key]) for h in history for key in ("loss", "eval_loss") if key in h]
    assert [k for k, _ in runs["sp2"]] == [k for k, _ in runs["one"]] and runs["one"], runs
    for (key, got), (_, want) in zip(runs["sp2"], runs["one"]):
        _close(float(got), float(want), f"example {key} under {yaml_name}")
