"""Every training command on the one loop writes the metrics it wrote on its own loop.

`tests/data/loop_golden.json` holds each command's fixed-seed run as the
separate loops wrote it (`python -m tests.loop_golden` recorded it then); each
test reruns the same run and compares every number of metrics.jsonl.
"""

import contextlib
import json

import pytest

from tests import loop_golden


@pytest.mark.parametrize("name", sorted(loop_golden.RUNS))
def test_the_run_writes_the_golden_metrics(name, tmp_path):
    golden = json.loads(loop_golden.GOLDEN.read_text())[name]
    with pytest.warns(UserWarning, match="truncated") if name == "classify" else \
            contextlib.nullcontext():
        rows = loop_golden.RUNS[name](tmp_path / name)
    assert [(r["kind"], r["step"]) for r in rows] == [(r["kind"], r["step"]) for r in golden]
    for new, old in zip(rows, golden):
        assert new == old, f"{name}, {new['kind']} at step {new['step']}"
    assert any(r["kind"] == "train" and r["loss"] > 0 for r in rows)  # a run that learns

