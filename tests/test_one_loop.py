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



def test_a_nan_stops_a_fine_tuning_run_with_its_last_good_checkpoint(tmp_path, monkeypatch):
    """Fine-tuning stops on a non-finite loss as pretraining does (one loop):
    the rows before it logged, the checkpoint before it kept, nothing after."""
    import jax
    import jax.numpy as jnp

    from jaxllm.train import checkpoint, loop

    real = loop._steps

    def poisoned_steps(*args):
        train_step, eval_step = real(*args)

        def step(state, batch):
            state, metrics = train_step(state, batch)
            if int(state.step) >= 5:  # step 6 reports a NaN loss
                state = state._replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
            return state, metrics

        return step, eval_step

    monkeypatch.setattr(loop, "_steps", poisoned_steps)
    run = tmp_path / "classify"
    with pytest.raises(loop.TrainingDiverged, match="loss is nan at step 6.*last good "
                                                    "checkpoint is step 4") as err, \
            pytest.warns(UserWarning, match="truncated"):
        loop_golden.classify(run)
    assert err.value.last_checkpoint == 4
    assert checkpoint.open_manager(run).all_steps() == [4]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 5
    assert (run / "loss.png").is_file()  # the plots of what ran
