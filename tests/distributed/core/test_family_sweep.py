"""Every causal-LM family of the installed transformers under SP (tests/families.py builds them tiny).

Each family is classified at sp2, sp4 and dp2 x sp2 as
  * "parity": the local logits of the shard and every parameter gradient (summed over the SP group)
    equal the single-process model's on the same batch (test_attention_parity's assertion), or
  * "refused: <message>": ulysses_sp raised its ValueError (at apply, or at the first SP forward).
Anything else (a crash, a mismatch, a hang) fails the test. One spawn of ranks per world size:
world 2 runs every family at sp2; world 4 runs sp4 and dp2 x sp2 for one family per combination of
attention properties (families.property_representatives: GQA, MLA, windows, chunks, softcapping,
MoE), since all of them would take minutes there on CI's two cores. The classification is compared
with the committed record, tests/family_record.json, from which docs/support-matrix.md's family table is
generated; after a change that makes a family work (or a new transformers release), one command
rewrites both:

    ULYSSES_SP_UPDATE_FAMILIES=1 python -m pytest -q tests/distributed/core/test_family_sweep.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import transformers

import ulysses_sp
from tests import families
from tests.distributed import harness
from tests.distributed.core.test_attention_parity import check_model_parity

#: the world sizes and the layouts each spawn runs
WORLDS = {2: {"sp2": 2}, 4: {"sp4": 4, "dp2xsp2": 2}}


def _classify(ctx, topo, model_type: str) -> str:
    """ "parity", "refused: <message>", or (failing the test after the sweep) "mismatch: ..." / "crash: ..."."""
    model = families.tiny_model(model_type, dtype=ctx.dtype)
    try:
        check_model_parity(ctx, topo, model, model_type, seq=families.SEQ)
    except ValueError as e:
        return f"refused: {e}"
    except AssertionError as e:
        return f"mismatch: {e}"
    except Exception as e:  # every rank raises alike (same model, same batch): the sweep goes on, and fails
        return f"crash: {type(e).__name__}: {e}"
    return "parity"


def _body_sweep(ctx, layouts: dict, model_types: list[str], out_path: str):
    results = {}
    for layout, sp in layouts.items():
        topo = ulysses_sp.init_sp(sp)
        for model_type in model_types:
            with open(f"{out_path}.rank{ctx.rank}", "a") as log:  # which family a hang is in
                log.write(f"{layout} {model_type}\n")
            results.setdefault(model_type, {})[layout] = _classify(ctx, topo, model_type)
    if ctx.rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


@harness.cpu_only(
    "the record is of the CPU suite's transformers; the GPU run checks the same bodies in test_attention_parity"
)
@pytest.mark.parametrize("world", sorted(WORLDS), ids=[f"world{w}" for w in sorted(WORLDS)])
def test_family_sweep(world, tmp_path):
    out = Path(os.environ.get("ULYSSES_SP_SWEEP_DIR", tmp_path)) / f"sweep{world}.json"
    record = families.load_record()
    if world == 2:
        model_types = [t for t in families.causal_lm_families() if t not in families.SKIPS]
    else:
        model_types = families.property_representatives(record)
    harness.run(_body_sweep, world, WORLDS[world], model_types, str(out))
    found = json.loads(out.read_text())
    failed = {t: r for t, row in found.items() for r in row.values() if r.startswith(("mismatch", "crash"))}
    assert not failed, "families that neither match the single-process model nor are refused: " + "; ".join(
        f"{t}: {r}" for t, r in failed.items()
    )
    if os.environ.get("ULYSSES_SP_UPDATE_FAMILIES") == "1":
        families.save_record(families.merge_record(record, found, WORLDS[world]))
        return
    if record.get("transformers") != transformers.__version__:
        pytest.skip(
            f"the record is of transformers {record.get('transformers')}, this is {transformers.__version__}: "
            "every family passed or was refused (no crash, no mismatch); rewrite the record to compare"
        )
    expected = {t: {k: r[k] for k in WORLDS[world] if k in r} for t, r in record["families"].items()}
    expected = {t: r for t, r in expected.items() if r}
    changed = sorted(t for t in set(found) | set(expected) if found.get(t) != expected.get(t))
    assert not changed, (
        "families classified differently from the record "
        f"({families.RECORD_PATH}): "
        + "; ".join(f"{t}: record {expected.get(t)}, now {found.get(t)}" for t in changed)
        + ". If intended, rewrite it: ULYSSES_SP_UPDATE_FAMILIES=1 python -m pytest -q "
        "tests/distributed/core/test_family_sweep.py"
    )
