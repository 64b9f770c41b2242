"""The one training loop's parts (`jaxllm.train.loop`): the run folder's check
(`check_run_folder`, also what every training command checks before any
work), the resume checks (`check_resumable`) and the step loop (steps,
logging, evaluation, saves, stops).

Metrics stay on the device between log points and are fetched in one
transfer (`flush`), so the host never waits on a step it does not need to
see. The first step is timed apart from the others: it compiles.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
from tqdm.auto import tqdm

from jaxllm import interrupt
from jaxllm.train import checkpoint


@dataclasses.dataclass
class Timing:
    train_s: float = 0.0  # wall time of the steps, evaluations and saves excluded
    compile_s: float | None = None  # the first step's wall time (it compiles)
    timed_steps: int = 0  # steps after the first


RESULT_FILES = ("metrics.jsonl", "summary.json")  # what a run leaves beside its checkpoints
KIND_NAMES = {None: "a pretraining run", "classify": "a classifier",
              "instruct": "an instruction-tuned run", "dpo": "a DPO run"}  # a checkpoint's "kind", in words
# How often a run logs, evaluates and saves (and how many checkpoints it keeps):
# no step depends on them, so a resumed run may change them in any section.
# What a resume may change: how often the run logs, evaluates and saves, and what it keeps.
CADENCE_FIELDS = ("save_every", "keep", "log_every", "eval_every", "keep_best")


def _without_cadence(meta: dict[str, Any]) -> dict[str, Any]:
    return {k: ({f: x for f, x in v.items() if f not in CADENCE_FIELDS}
                if isinstance(v, dict) else v) for k, v in meta.items()}


def has_checkpoints(run_dir) -> bool:
    """Whether a run folder holds a saved step (an Orbax step folder: its name
    is the step number)."""
    where = checkpoint.checkpoint_dir(run_dir)
    return where.is_dir() and any(p.name.isdigit() for p in where.iterdir())


def check_run_folder(run_dir, *, resume: bool, kind: str | None = None,
                     flag: str = "--out") -> None:
    """Refuse, with a sentence, a run folder a training run cannot use: a file,
    a path under a file, a folder that cannot be written, a folder holding
    another run's results (`RESULT_FILES`) but no checkpoint (a new run
    would overwrite them, resumed or not), or on `resume` checkpoints of
    another `kind` of run ("classify", "instruct"; None: pretraining).
    `flag` names the option the folder came from. Creates nothing."""
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder; give a folder for the run")
    existing = path
    while not existing.exists():  # the nearest existing folder above: where mkdir starts
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing != path and not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, so no folder can be made "
                         "under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path} cannot be written: no write permission on "
                         f"{'it' if existing == path else existing}")
    if not path.is_dir():
        return
    if not has_checkpoints(path):
        results = [name for name in RESULT_FILES if (path / name).exists()]
        if results:
            raise ValueError(f"{flag} {path} holds the {' and '.join(results)} of a run but no "
                             "checkpoint to resume, and a new run would overwrite them; choose "
                             "another folder (or move those files away to start over here)")
        return
    if resume:
        try:
            saved = checkpoint.read_meta(path)
        except (OSError, ValueError):  # a damaged newest checkpoint: the resume reports it
            return
        if saved.get("kind") != kind:
            have = KIND_NAMES.get(saved.get("kind"), f"a {saved.get('kind')!r} run")
            raise ValueError(f"{flag} {path} is {have}, not {KIND_NAMES.get(kind, kind)} to "
                             f"resume; give this run another {flag} folder")


def say_nothing_to_resume(run_dir) -> None:
    """What --resume says of a folder without a checkpoint: the run starts afresh."""
    print(f"--resume: {run_dir} holds no checkpoint; starting a new run there at step 0",
          file=sys.stderr)


def check_resumable(run_dir, saved: dict[str, Any], identity: dict[str, Any],
                    step: int) -> list[dict[str, Any]]:
    """The run's schedule changes, with this resume's: the checkpoint `step`'s
    metadata `saved` must agree with `identity` in every setting but the
    cadence (`CADENCE_FIELDS`) and the total step count, which may grow (or
    shrink to no less than `step`): the schedule is then recomputed for the
    new total from `step` on."""
    saved, identity = _without_cadence(saved), _without_cadence(identity)
    if "sha256" not in (saved.get("data") or {}) and isinstance(identity.get("data"), dict):
        # a run saved before its data's digest was recorded: the counts still compare
        identity = dict(identity, data={k: v for k, v in identity["data"].items()
                                        if k != "sha256"})
    total = identity.get("train", {}).get("total_steps")
    saved_total = saved.get("train", {}).get("total_steps", total)
    if total is None or saved_total == total:
        checkpoint.check_compatible(run_dir, saved, identity)
        return list(saved.get("schedule_changes", []))
    if total < step:
        raise ValueError(f"{run_dir} is at step {step}: a total of {total} steps ends before it; "
                         f"give at least {step} steps (or a new run folder)")
    checkpoint.check_compatible(run_dir, saved, dict(identity, train=dict(
        identity["train"], total_steps=saved_total)))
    return [*saved.get("schedule_changes", []),
            {"at_step": step, "total_steps": total, "was": saved_total}]


def progress_line(done: int, start: int, end: int, seconds: float,
                  shown: dict[str, str]) -> str:
    """The progress bar's content as one line for a log: 'step 300/1200 (25%),
    loss 2.345, tok_s 12,345, 41 s elapsed, about 2 min left'."""
    rate = (done - start) / seconds if seconds > 0 else 0.0
    left = (end - done) / rate if rate > 0 else None

    def span(s: float) -> str:
        return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"

    parts = [f"step {done}/{end} ({done / end:.0%})", *(f"{k} {v}" for k, v in shown.items()),
             f"{span(seconds)} elapsed"]
    if left is not None and done < end:
        parts.append(f"about {span(left)} left")
    return ", ".join(parts)


def run_steps(state, train_step, batch_at: Callable[[int], Any], *, start: int, end: int,
              log_every: int, eval_every: int, save_every: int,
              record: Callable[[int, dict], dict], evaluate: Callable[[Any, int], Any],
              save: Callable[[Any, int], None], log, diverged: Callable[[int, float], Exception],
              progress: bool = True, tokens_per_step: int | None = None, run_dir=None):
    """Run steps `start` to `end`; returns (state, Timing, the step-0 evaluation or None).

    `record(step, metrics)` turns one step's host metrics into its
    `metrics.jsonl` row (and counts what the caller counts); a non-finite loss
    raises `diverged(step, loss)` after the rows before it are logged.
    `evaluate(params, step)` runs at step 0 of a fresh run, every
    `eval_every` steps and at the end; `save(state, step)` every
    `save_every` steps and at the end. With `tokens_per_step` the progress
    bar shows tokens/s over the steps since the last fetch. The bar is drawn
    only on a terminal; into a log or a pipe, `progress` is one plain line
    per evaluation instead (`progress_line`).

    SIGINT or SIGTERM (`jaxllm.interrupt`, in the `jaxllm` command) stops the
    steps at the next step boundary: the state is saved there unless it just
    was, and `interrupt.Stopped` is raised, naming the checkpoint in `run_dir`.
    """
    timing = Timing()
    pending: list[tuple[int, dict]] = []
    seg_start, seg_steps = time.perf_counter(), 0
    live = progress and sys.stderr.isatty()
    bar = tqdm(total=end, initial=start, unit="step", dynamic_ncols=True, disable=not live)
    began, shown = time.perf_counter(), {}

    def flush() -> None:
        nonlocal seg_steps
        if not pending:
            return
        host = jax.device_get([m for _, m in pending])
        seconds = time.perf_counter() - seg_start
        timing.train_s += seconds
        rows = []
        for (step, _), m in zip(pending, host):
            loss = float(m["loss"])
            if not math.isfinite(loss):
                log.append(rows)
                pending.clear()
                raise diverged(step, loss)
            rows.append(record(step, m))
        log.append(rows)
        postfix = {"loss": f"{rows[-1]['loss']:.3f}"}
        if tokens_per_step:
            postfix["tok_s"] = f"{seg_steps * tokens_per_step / max(seconds, 1e-9):,.0f}"
        bar.set_postfix(postfix)
        shown.update(postfix)
        pending.clear()
        seg_steps = 0

    first_eval = None
    saved, stop = start, None
    try:
        with interrupt.deferred():
            if start == 0:
                first_eval = evaluate(state.params, 0)
            seg_start = time.perf_counter()
            for step in range(start, end):
                state, metrics = train_step(state, batch_at(step))
                done = step + 1
                pending.append((done, metrics))
                bar.update(1)
                if timing.compile_s is None:
                    jax.block_until_ready(metrics)
                    timing.compile_s = time.perf_counter() - seg_start
                    seg_start = time.perf_counter()
                else:
                    timing.timed_steps += 1
                    seg_steps += 1
                at_eval = done % eval_every == 0 or done == end
                at_save = done % save_every == 0 or done == end
                if done % log_every == 0 or at_eval or at_save:
                    flush()
                    if at_eval and progress and not live:
                        print(progress_line(done, start, end, time.perf_counter() - began, shown),
                              file=sys.stderr, flush=True)
                    if at_eval:
                        evaluate(state.params, done)
                    if at_save:
                        save(state, done)
                        saved = done
                    seg_start = time.perf_counter()
                if interrupt.stop_due(done):  # every process, every step (see stop_due)
                    stop = done
                    break
            flush()
            if stop is None and interrupt.requested() and end > start:
                stop = end  # the stop came during the last evaluation or save
            if stop is not None and saved != stop:
                save(state, stop)
                saved = stop
    finally:
        bar.close()
    if stop is not None:
        raise interrupt.Stopped(_stopped(stop, saved, run_dir), interrupt.stop_signal())
    return state, timing, first_eval


def _stopped(step: int, saved: int, run_dir) -> str:
    """The line a stopped training run ends with."""
    where = f" in {checkpoint.checkpoint_dir(run_dir)}" if run_dir is not None else ""
    return (f"stopped by {interrupt.signal_name(interrupt.stop_signal())} at step {step}; "
            f"saved checkpoint {saved}{where} (continue with --resume)")
