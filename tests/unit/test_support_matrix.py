"""docs/support-matrix.md's family table is the family sweep's committed record, rendered; the record
covers every causal-LM family the installed transformers ships (tests/families.py)."""

import pytest
import transformers

from tests import families


def test_doc_table_is_the_rendered_record():
    assert families.doc_table() == families.render_table(families.load_record()), (
        "docs/support-matrix.md's family table differs from tests/family_record.json; regenerate both with "
        "ULYSSES_SP_UPDATE_FAMILIES=1 python -m pytest -q tests/distributed/core/test_family_sweep.py"
    )


def test_record_covers_every_family_and_few_are_skipped():
    assert len(families.SKIPS) <= 12, "the skip table is for the few families no config alone can build"
    record = families.load_record()
    if record["transformers"] != transformers.__version__:
        pytest.skip(f"the record is of transformers {record['transformers']}, this is {transformers.__version__}")
    swept = {t for t in families.causal_lm_families() if t not in families.SKIPS}
    assert set(record["families"]) == swept
    assert all(row.get("sp2") for row in record["families"].values())
    assert record["composite"] == families.composite_families()
