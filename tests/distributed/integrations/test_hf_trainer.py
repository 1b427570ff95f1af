"""SPTrainer (2 processes, sp2) against the stock transformers.Trainer (1 process) on the same global
batch, fp32: every logged training loss, the eval losses (mid-training and final, computed under
SP) and the final train_loss equal within 1e-4 relative. Variable-length rows (padding to a
multiple of 2 and -100 labels), gradient accumulation 2, clipping and a linear LR schedule as the
Trainer does them; evaluation with a batch size that leaves a partial last batch."""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from torch.utils.data import Subset

from tests.distributed import harness
from tests.helpers import ROOT, flags, launcher_command, run_ok, tiny_model

pytestmark = pytest.mark.slow

STEPS = 4


def _train_and_evaluate(ctx, sp_size: int | None, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", OMP_NUM_THREADS="1")
    from transformers import Trainer, TrainingArguments

    from ulysses_sp.data.collate import collate_padded
    from ulysses_sp.data.text import load_text_dataset
    from ulysses_sp.integrations.hf_trainer import SPTrainer

    rows = load_text_dataset(None, 40, pack=False)  # one row per document piece, 1..40 tokens
    train, evaluation = Subset(rows, range(64)), Subset(rows, range(64, 71))  # 7 rows: batches 3, 3, 1
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
        save_strategy="no",
        disable_tqdm=True,
    )
    common = {
        "model": tiny_model("tiny-llama", seed=3),
        "args": args,
        "train_dataset": train,
        "eval_dataset": evaluation,
        "data_collator": collate_padded,
    }
    trainer = Trainer(**common) if sp_size is None else SPTrainer(**common, sp_size=sp_size)
    trainer.train()
    final = trainer.evaluate()
    if ctx.rank == 0:
        history = trainer.state.log_history
        result = {
            "loss": [h["loss"] for h in history if "loss" in h],
            "eval_loss": [h["eval_loss"] for h in history if "eval_loss" in h],
            "train_loss": next(h["train_loss"] for h in history if "train_loss" in h),
            "final_eval_loss": final["eval_loss"],
        }
        with open(out_path, "w") as f:
            json.dump(result, f)


def _close(a: float, b: float, what: str) -> None:
    assert abs(a - b) <= 1e-4 * abs(b), f"{what}: SP {a} vs non-SP {b}"


def test_sp_trainer_matches_stock_trainer(tmp_path):
    ref_path, sp_path = tmp_path / "ref.json", tmp_path / "sp.json"
    with ThreadPoolExecutor(2) as pool:  # the two jobs are independent: overlap their start-up
        jobs = [
            pool.submit(harness.run, _train_and_evaluate, 1, None, str(ref_path)),
            pool.submit(harness.run, _train_and_evaluate, 2, 2, str(sp_path)),
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


def test_trainer_example_matches_one_process(tmp_path):
    """examples/trainer_sp.py runs under torchrun at sp2 and its logged losses (training and evaluation)
    equal the same script's in one process without SP."""
    example = os.path.join(ROOT, "examples", "trainer_sp.py")
    runs = {}
    for name, cmd in (
        ("sp2", launcher_command("torchrun", 2, example, *flags(sp_size=2, out=tmp_path / "sp2"))),
        ("one", [sys.executable, example, *flags(sp_size=1, out=tmp_path / "one")]),
    ):
        run_ok(cmd, cwd=tmp_path)
        history = json.loads((tmp_path / name / "trainer_state.json").read_text())["log_history"]
        runs[name] = [(key, h[key]) for h in history for key in ("loss", "eval_loss") if key in h]
    assert [k for k, _ in runs["sp2"]] == [k for k, _ in runs["one"]] and runs["one"], runs
    for (key, got), (_, want) in zip(runs["sp2"], runs["one"]):
        _close(float(got), float(want), f"example {key}")
