"""The DPO run: preference pairs in, a model that prefers the chosen answers, its answers out.

`finetune_dpo(...)` runs `TrainConfig.total_steps` steps of the engine's
jitted train step with `jaxllm.finetune.dpo.dpo_task` over the seeded,
resumable `PreferenceBatches`, on the fine-tuning commands' step loop and
start-or-resume (`jaxllm.train.runner`):

- before the first step, the reference's sequence log-probabilities of every
  pair (train, validation, test) in one pass (`reference_logprobs`: the
  starting weights, or with LoRA the same weights with the adapters off),
  kept in the run folder (`reference.npz`) so a resumed run reads them;
- every `log_every` steps, the step metrics to `metrics.jsonl`: the loss, the
  chosen and rejected rewards, the margin and the reward accuracy; a
  non-finite loss stops the run, naming the step;
- at step 0, every `eval_every` steps and at the end, the same five over the
  first `eval_batches` training and validation batches, and greedy answers
  to the first `sample_count` validation prompts (`samples.txt`);
- every `save_every` steps and at the end, an Orbax checkpoint;
- after training, the five over the whole test split, and a greedy answer to
  every test prompt next to its chosen and rejected answers (`responses.json`);
  `loss.png` (a panel per metric), `summary.json` with steps/s and peak memory.

The batch order is a function of the step and the seed, and the reference
values are read back from the run, so `resume=True` writes the losses an
uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import resource
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxllm.config import GPTConfig
from jaxllm.data.preferences import (PreferenceBatches, fixed_pair_batches, split_preferences,
                                     tokenize_pairs)
from jaxllm.finetune.dpo import REDUCTIONS, dpo_task, reference_logprobs
from jaxllm.finetune.instruct import PROMPT_STYLES, generate_responses
from jaxllm.layout import check_params
from jaxllm.train import checkpoint
from jaxllm.train.lock import run_lock
from jaxllm.train.loop import TrainingDiverged, _init_fn
from jaxllm.train.metrics import MetricsLog
from jaxllm.train.optim import TrainConfig, make_optimizer
from jaxllm.train.runner import check_run_folder, run_steps, start_or_resume
from jaxllm.train.step import make_eval_step, make_train_step
from jaxllm.train.task import Trainable, count_trainable

META_KIND = "dpo"
REFERENCE_FILE = "reference.npz"
METRICS = ("loss", "chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """The DPO loss, data, evaluation, checkpoint and response settings of a run."""

    beta: float = 0.1
    logprob: str = "mean"  # "mean" (the book; rewards without beta) or "sum" (TRL; with beta)
    style: str = "alpaca"  # prompt format: alpaca or chat
    book_collate: bool = False  # the book's sequences and masks exactly (no end-of-text)
    decay_all: bool = False  # weight decay on every trainable leaf (torch's AdamW)
    allowed_max_length: int = 1024  # rows cut to this (and to the context length)
    pad_multiple: int = 16  # batch widths rounded up to a multiple (fewer compilations)
    eval_every: int = 5
    eval_batches: int = 5  # batches of each split per evaluation
    log_every: int = 5
    save_every: int = 100
    keep: int = 2  # checkpoints kept
    sample_count: int = 3  # validation prompts answered at every evaluation (0: none)
    sample_tokens: int = 64
    response_tokens: int = 256  # max_new_tokens of the test responses
    response_batch: int = 8  # prompts per generate call
    responses: bool = True  # answer every test prompt after training

    def __post_init__(self) -> None:
        dpo_task(self.beta, self.logprob)  # names a bad beta or convention
        if self.style not in PROMPT_STYLES:
            raise ValueError(f"DPOConfig.style must be one of {PROMPT_STYLES}, got {self.style!r}")
        if self.book_collate and self.style != "alpaca":
            raise ValueError("the book's collate (book_collate) needs the alpaca style")
        for name in ("allowed_max_length", "pad_multiple", "eval_every", "eval_batches",
                     "log_every", "save_every", "keep", "sample_tokens", "response_tokens",
                     "response_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"DPOConfig.{name} must be a positive int, got {v!r}")
        if isinstance(self.sample_count, bool) or not isinstance(self.sample_count, int) \
                or self.sample_count < 0:
            raise ValueError(f"DPOConfig.sample_count must be an int >= 0, "
                             f"got {self.sample_count!r}")


@functools.lru_cache(maxsize=4)
def _programs(config: GPTConfig, tc: TrainConfig, beta: float, logprob: str, decay_all: bool,
              trainable: Trainable = None):
    """(init, train step, eval step) with one optimizer, compiled once per
    configuration (a resume in the same process reuses them)."""
    task = dpo_task(beta, logprob)
    optimizer = make_optimizer(tc.replace(weight_decay_on="all") if decay_all else tc)
    return (_init_fn(config, tc, optimizer, trainable),
            make_train_step(config, tc, optimizer, task=task, trainable=trainable),
            make_eval_step(config, task=task))


def _means(eval_step, params, batches) -> dict[str, float]:
    """The five metrics over every pair of `batches`."""
    sums = jax.device_get([eval_step(params, b) for b in batches])
    count = max(float(sum(s["count"] for s in sums)), 1e-30)
    out = {"loss": float(sum(s["loss_sum"] for s in sums)) / count}
    for key in METRICS[1:]:
        out[key] = float(sum(s[key] for s in sums)) / count
    return out


def peak_memory_bytes() -> dict[str, int | None]:
    """The accelerator's peak bytes in use (None where the backend keeps no
    count, as on CPU) and this process's peak resident memory."""
    stats = jax.devices()[0].memory_stats() or {}
    return {"device_peak_bytes": stats.get("peak_bytes_in_use"),
            "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def finetune_dpo(run_dir, config: GPTConfig, tc: TrainConfig, dc: DPOConfig, tokenizer,
                 entries: Sequence[dict], *, params=None, resume: bool = False,
                 progress: bool = True, data_name: str = "preferences", source: str = "random",
                 stop_at: int | None = None, fallback: bool = True,
                 trainable: Trainable = None) -> dict[str, Any]:
    """DPO-tune (or resume) the run in `run_dir` on preference `entries`; returns the summary.

    `entries` are split 85 / 10 / rest (train / test / validation, in file
    order). `params` are the starting weights, which are also the reference
    (default: `init_params(config)`; with LoRA adapters in them, the reference
    is the weights without the adapters); they are donated to the train step.
    `trainable` selects the leaves that train (default all; `jaxllm.lora.TRAINABLE`
    for adapters). `stop_at` ends the run early at that step, saving there.
    `fallback=False` refuses a damaged latest checkpoint on resume.
    """
    run_dir = Path(run_dir)
    check_run_folder(run_dir, resume=resume, kind=META_KIND)
    with run_lock(run_dir):
        return _run(run_dir, config, tc, dc, tokenizer, entries, params, resume, progress,
                    data_name, source, stop_at, fallback, trainable)


def _reference(run_dir: Path, state, config, dc, splits, batch_size, collate_kw, fresh: bool):
    """{split: {"ref_chosen", "ref_rejected"}}: computed from the starting state and
    saved, or read back on resume."""
    path = run_dir / REFERENCE_FILE
    if not fresh:
        if not path.is_file():
            raise ValueError(f"{path} is missing: the reference log-probabilities of the run's "
                             f"starting model cannot be recomputed from a resumed state; start "
                             f"the run afresh")
        with np.load(path) as saved:
            out = {s: {k: saved[f"{s}/{k}"] for k in ("ref_chosen", "ref_rejected")}
                   for s in splits}
        for s, pairs in splits.items():
            if len(out[s]["ref_chosen"]) != len(pairs):
                raise ValueError(f"{path} holds {len(out[s]['ref_chosen'])} {s} pairs, the data "
                                 f"{len(pairs)}: resume with the run's own data")
        return out
    out = {s: reference_logprobs(state.params, config, pairs, batch_size, reduction=dc.logprob,
                                 collate_kwargs=collate_kw) for s, pairs in splits.items()}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **{f"{s}/{k}": v for s, ref in out.items() for k, v in ref.items()})
    tmp.replace(path)
    return out


def _run(run_dir, config, tc, dc, tokenizer, entries, params, resume, progress, data_name,
         source, stop_at, fallback, trainable):
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the {tokenizer.name} tokenizer has {tokenizer.vocab_size} ids but the "
                         f"model's vocab_size is {config.vocab_size}")
    train_entries, test_entries, val_entries = split_preferences(entries)
    if not val_entries or not test_entries:
        raise ValueError(f"{len(entries)} entries leave an empty validation or test split; "
                         f"give at least 20")
    collate_kw = dict(allowed_max_length=min(dc.allowed_max_length, config.context_length),
                      pad_multiple=dc.pad_multiple, pad_id=tokenizer.eot_id)
    splits = {name: tokenize_pairs(e, tokenizer, dc.style, book=dc.book_collate)
              for name, e in (("train", train_entries), ("validation", val_entries),
                              ("test", test_entries))}
    if len(splits["train"]) < tc.batch_size:
        raise ValueError(f"{len(splits['train'])} training pairs are fewer than one batch of "
                         f"{tc.batch_size}")

    identity = {
        "model": config.to_dict(), "train": dataclasses.asdict(tc), "tokenizer": tokenizer.name,
        "dpo": dataclasses.asdict(dc),
        "data": {"train": len(train_entries), "test": len(test_entries),
                 "validation": len(val_entries)},
    }
    if trainable is not None:
        identity["trainable"] = trainable if isinstance(trainable, str) else repr(trainable)
    meta = dict(identity, kind=META_KIND, data_name=data_name, source=source,
                tokenizer_dir=tokenizer.directory)
    manager = checkpoint.open_manager(run_dir, keep=dc.keep, create=True)
    log = MetricsLog(run_dir)
    if params is not None:
        check_params(params, config)
    init, train_step, eval_step = _programs(config, tc, dc.beta, dc.logprob, dc.decay_all,
                                            trainable)
    state, latest, saved, changes = start_or_resume(run_dir, manager, identity, init, params,
                                                    seed=tc.seed, resume=resume,
                                                    fallback=fallback)
    start = int(state.step)
    ref_start = time.perf_counter()
    reference = _reference(run_dir, state, config, dc, splits, tc.batch_size, collate_kw,
                           fresh=latest is None)
    reference_s = time.perf_counter() - ref_start
    if latest is None:
        log.clear()
    else:
        log.truncate_after(start)
    if changes:
        meta["schedule_changes"] = changes
    batches = PreferenceBatches(splits["train"], tc.batch_size, seed=tc.seed,
                                collate_kwargs=collate_kw, reference=reference["train"])
    meta["batches_per_epoch"] = batches.batches_per_epoch
    (run_dir / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    evals = {s: fixed_pair_batches(splits[s], tc.batch_size, dc.eval_batches,
                                   reference=reference[s], **collate_kw)
             for s in ("train", "validation")}
    end = tc.total_steps if stop_at is None else min(stop_at, tc.total_steps)
    last_saved = latest
    samples_path = run_dir / "samples.txt"
    if start == 0:
        samples_path.write_text("")

    def evaluate(params, step: int) -> dict[str, Any]:
        record = {"kind": "eval", "step": step, "pairs": step * tc.batch_size}
        for split, prefix in (("train", "train_"), ("validation", "val_")):
            record.update({prefix + k: v for k, v in _means(eval_step, params,
                                                            evals[split]).items()})
        shown = val_entries[:dc.sample_count]
        if shown and math.isfinite(record["val_loss"]):
            answers, _ = generate_responses(params, config, tokenizer, shown, style=dc.style,
                                            max_new_tokens=dc.sample_tokens,
                                            batch_size=len(shown))
            record["samples"] = answers
            with open(samples_path, "a") as f:
                f.write(f"== step {step} (val loss {record['val_loss']:.3f}, reward margin "
                        f"{record['val_reward_margin']:.3f})\n")
                for e, a in zip(shown, answers):
                    f.write(f"-- {e['instruction']}\n{a}\n")
                f.write("\n")
        log.append([record])
        tqdm.write(f"step {step}: train loss {record['train_loss']:.3f}, val loss "
                   f"{record['val_loss']:.3f}, val reward margin {record['val_reward_margin']:.3f}"
                   f", accuracy {record['val_reward_accuracy']:.2f}")
        return record

    def diverged(step: int, loss: float) -> TrainingDiverged:
        where = (f"the last good checkpoint is step {last_saved}" if last_saved is not None
                 else "no checkpoint was saved")
        return TrainingDiverged(f"training diverged: loss is {loss} at step {step} ({where})",
                                step, last_saved)

    def save(state, step: int) -> None:
        nonlocal last_saved
        checkpoint.save(manager, state, dict(meta, data_position=step))
        last_saved = step

    def record(step: int, m) -> dict[str, Any]:
        count = float(m["count"])
        return {"kind": "train", "step": step, "pairs": step * tc.batch_size,
                "loss": float(m["loss"]), **{k: float(m[k]) / count for k in METRICS[1:]},
                "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"])}

    wall_start = time.perf_counter()
    try:
        state, timing, first_eval = run_steps(
            state, train_step, batches.batch_at, start=start, end=end, log_every=dc.log_every,
            eval_every=dc.eval_every, save_every=dc.save_every, record=record,
            evaluate=evaluate, save=save, log=log, diverged=diverged, progress=progress,
            run_dir=run_dir)
    finally:
        manager.close()
        records = log.read()
        if records:
            plot_dpo(records, run_dir / "loss.png",
                     title=f"{data_name}: DPO, beta {dc.beta}, {dc.logprob} log-probabilities")
    wall_train = time.perf_counter() - wall_start
    memory = peak_memory_bytes()

    # -- the test split: the metrics, then an answer to every prompt ------------
    params = state.params
    test = _means(eval_step, params, fixed_pair_batches(splits["test"], tc.batch_size,
                                                        reference=reference["test"],
                                                        **collate_kw))
    gen_stats = None
    if dc.responses:
        answers, gen_stats = generate_responses(
            params, config, tokenizer, test_entries, style=dc.style,
            max_new_tokens=dc.response_tokens, batch_size=dc.response_batch)
        out = [dict(e, model_response=a) for e, a in zip(test_entries, answers)]
        (run_dir / "responses.json").write_text(json.dumps(out, indent=2) + "\n")

    evals_done = [r for r in records if r["kind"] == "eval"]
    first_eval = first_eval or (evals_done[0] if evals_done else None)
    last = evals_done[-1] if evals_done else {}
    summary = {
        "run_dir": str(run_dir), "source": source, "beta": dc.beta, "logprob": dc.logprob,
        "style": dc.style, "book_collate": dc.book_collate, "steps": int(state.step),
        "resumed_from": latest, "epochs": int(state.step) / batches.batches_per_epoch,
        "train_pairs": len(train_entries), "val_pairs": len(val_entries),
        "test_pairs": len(test_entries),
        "trainable_params": count_trainable(state.params, trainable),
        "total_params": sum(int(x.size) for x in jax.tree.leaves(state.params)),
        "reference_s": reference_s if latest is None else None,
        "train_wall_s": wall_train, "compile_s": timing.compile_s,
        "steps_per_s": (timing.timed_steps / timing.train_s
                        if timing.train_s and timing.timed_steps else None),
        **memory,
        "initial": {k: first_eval.get("val_" + k) for k in METRICS} if first_eval else None,
        "final_train": {k: last.get("train_" + k) for k in METRICS} if last else None,
        "final_val": {k: last.get("val_" + k) for k in METRICS} if last else None,
        "test": test, "responses": gen_stats, "last_checkpoint": last_saved,
        "wall_s": time.perf_counter() - wall_start,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def plot_dpo(records: list[dict[str, Any]], path, *, title: str | None = None) -> None:
    """A panel per metric against steps: each step's training batch and the
    evaluations on the training and validation batches (at `plot.DPI`, as
    every run's curves)."""
    from jaxllm.train.plot import DPI, plt

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    panels = (("loss", "loss"), ("rewards", None), ("reward_margin", "reward margin"),
              ("reward_accuracy", "reward accuracy"))
    fig, axes = plt.subplots(2, 2, figsize=(9.6, 6.4))
    for ax, (key, label) in zip(axes.flat, panels):
        keys = ("chosen_reward", "rejected_reward") if key == "rewards" else (key,)
        for k, color in zip(keys, ("tab:blue", "tab:red")):
            name = k.replace("_", " ")
            if train:
                ax.plot([r["step"] for r in train], [r[k] for r in train], color=color,
                        alpha=0.5, linewidth=1.0, label=f"{name}, training batch each step")
            if evals:
                x = [r["step"] for r in evals]
                ax.plot(x, [r["train_" + k] for r in evals], "o-", color=color, markersize=3,
                        label=f"{name}, training data (evaluated)")
                ax.plot(x, [r["val_" + k] for r in evals], "s--", color=color, markersize=3,
                        label=f"{name}, validation data (evaluated)")
        ax.set_xlabel("step")
        ax.set_ylabel(label or "reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def format_summary(s: dict[str, Any]) -> str:
    rate = f"{s['steps_per_s']:.2f} steps/s" if s["steps_per_s"] else "n/a"
    lines = [f"DPO {s['steps']} steps ({s['epochs']:.2f} epochs, beta {s['beta']}, "
             f"{s['logprob']} log-probabilities) in {s['train_wall_s']:.1f} s, {rate}"]
    if s["final_val"]:
        v, i = s["final_val"], s["initial"]
        lines.append(f"validation: loss {v['loss']:.3f} (from {i['loss']:.3f}), reward margin "
                     f"{v['reward_margin']:.3f} (from {i['reward_margin']:.3f}), accuracy "
                     f"{v['reward_accuracy']:.2f}")
    t = s["test"]
    lines.append(f"test: loss {t['loss']:.3f}, reward margin {t['reward_margin']:.3f}, "
                 f"accuracy {t['reward_accuracy']:.2f}")
    lines.append(f"wrote {s['run_dir']}/: metrics.jsonl, loss.png, samples.txt, "
                 + ("responses.json, " if s["responses"] else "")
                 + f"{REFERENCE_FILE}, summary.json, checkpoints/{s['last_checkpoint']}")
    return "\n".join(lines)


__all__ = ["DPOConfig", "finetune_dpo", "format_summary", "plot_dpo", "REDUCTIONS"]
