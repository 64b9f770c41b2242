"""The fine-tuning step loop: when it logs, evaluates and saves, and how it stops on NaN."""

import sys
from types import SimpleNamespace

import jax.numpy as jnp
import pytest

from jaxllm.train.runner import run_steps


class Log:
    def __init__(self):
        self.rows = []

    def append(self, rows):
        self.rows.extend(rows)


class Diverged(Exception):
    pass


def _run(losses, *, start=0, end=None, log_every=2, eval_every=3, save_every=4, log=None,
         progress=False):
    calls = {"eval": [], "save": [], "batches": []}
    log = Log() if log is None else log

    def train_step(state, batch):
        step = state.step + 1
        return (SimpleNamespace(step=step, params=f"p{step}"),
                {"loss": jnp.float32(losses[step - 1]), "count": jnp.int32(2)})

    def batch_at(k):
        calls["batches"].append(k)
        return k

    def evaluate(params, step):
        calls["eval"].append((params, step))
        return {"step": step}

    result = run_steps(
        SimpleNamespace(step=start, params=f"p{start}"), train_step, batch_at, start=start,
        end=len(losses) if end is None else end, log_every=log_every, eval_every=eval_every,
        save_every=save_every, record=lambda step, m: {"step": step, "loss": float(m["loss"])},
        evaluate=evaluate, save=lambda state, step: calls["save"].append(step), log=log,
        diverged=lambda step, loss: Diverged(step, loss), progress=progress)
    return result, calls, log


def test_steps_logs_evaluations_and_saves():
    (state, timing, first), calls, log = _run([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    assert state.step == 7 and first == {"step": 0}
    assert calls["batches"] == list(range(7))
    assert [r["step"] for r in log.rows] == list(range(1, 8))
    assert log.rows[2]["loss"] == pytest.approx(0.8)
    assert calls["eval"] == [("p0", 0), ("p3", 3), ("p6", 6), ("p7", 7)]
    assert calls["save"] == [4, 7]
    assert timing.compile_s is not None and timing.timed_steps == 6


def test_a_resumed_run_skips_the_first_evaluation():
    (state, _, first), calls, log = _run([1.0] * 6, start=4)
    assert first is None and calls["batches"] == [4, 5]
    assert calls["eval"] == [("p6", 6)] and calls["save"] == [6]
    assert [r["step"] for r in log.rows] == [5, 6]


def test_a_non_finite_loss_stops_after_logging_the_steps_before_it():
    log = Log()
    with pytest.raises(Diverged) as err:
        _run([1.0, 0.9, float("nan"), 0.7, 0.6], log_every=5, eval_every=10, save_every=10,
             log=log)
    assert err.value.args[0] == 3  # the step, not the first one fetched
    assert [r["step"] for r in log.rows] == [1, 2]


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_in_a_log(capsys, monkeypatch):
    _run([1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4], progress=True)
    err = capsys.readouterr().err  # not a terminal: one line per evaluation, no bar
    lines = err.splitlines()
    assert "\r" not in err and [line.split(",")[0] for line in lines] == [
        "step 3/7 (43%)", "step 6/7 (86%)", "step 7/7 (100%)"]
    assert lines[0].split(", ")[1] == "loss 0.800" and "left" in lines[0]
    assert "elapsed" in lines[-1] and "left" not in lines[-1]

    monkeypatch.setattr(type(sys.stderr), "isatty", lambda self: True, raising=False)
    assert sys.stderr.isatty()
    _run([1.0, 0.9, 0.8], progress=True)
    err = capsys.readouterr().err
    assert "\r" in err and "3/3" in err and "step 3/3 (100%)" not in err  # the bar alone
    _run([1.0, 0.9, 0.8], progress=False)
    assert capsys.readouterr().err == ""
