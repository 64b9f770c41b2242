"""The instruction fine-tuning loop: entries in, a model that answers, its responses out.

`finetune_instruct(...)` runs `TrainConfig.total_steps` steps of the engine's
jitted train step with the masked LM loss (`lm_task`) over collated
instruction batches (`jaxllm.data.instructions`), and around them:

- every `log_every` steps, the pending step metrics to `metrics.jsonl` and
  the tqdm bar; a non-finite loss stops the run, naming the step;
- at step 0, every `eval_every` steps and at the end, the mean loss over the
  first `eval_batches` training and validation batches (a mean over every
  counted target) and greedy responses to the first `sample_count`
  validation prompts (`samples.txt`);
- every `save_every` steps and at the end, an Orbax checkpoint (the engine's
  `jaxllm.train.checkpoint`, with the instruction settings in its metadata,
  so `jaxllm chat` knows the prompt style);
- after training, the loss and perplexity over the whole test split, and a
  greedy KV-cached response to every test entry (`responses.json`, the test
  entries with a `model_response` field), with responses/s; with a `judge`
  (`jaxllm.finetune.judge`), a 0-100 score for each response (`judge_score`
  in responses.json) and their mean; an unreachable judge is reported and
  everything else kept;
- `loss.png` (the engine's plot: x is counted target tokens seen) and
  `summary.json`.

The batch order is a function of the step and the seed, so `resume=True`
continues from the last checkpoint and writes the losses an uninterrupted run
would. The step loop and the start-or-resume are `jaxllm.train.runner`'s, shared
with the classification loop.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax
from tqdm.auto import tqdm

from jaxllm.config import GPTConfig
from jaxllm.data.instructions import (InstructionBatches, entries_digest, fixed_batches,
                                      split_instructions, tokenize_entries)
from jaxllm.finetune.instruct import PROMPT_STYLES, format_prompt, generate_responses
from jaxllm.model import init_params
from jaxllm.train import checkpoint
from jaxllm.train.lock import run_lock
from jaxllm.train.loop import TrainingDiverged
from jaxllm.train.metrics import MetricsLog
from jaxllm.train.optim import TrainConfig
from jaxllm.train.plot import common_batch_count, plot_losses
from jaxllm.layout import check_params
from jaxllm.train.runner import check_run_folder, run_steps, start_or_resume
from jaxllm.train.step import init_train_state, make_eval_step, make_train_step
from jaxllm.train.task import Trainable, count_trainable

META_KIND = "instruct"


@dataclasses.dataclass(frozen=True)
class InstructConfig:
    """Data, evaluation, checkpoint and response settings of an instruction run."""

    style: str = "alpaca"  # prompt format: alpaca or chat
    mask_prompt: bool = False  # train on the response tokens only
    allowed_max_length: int = 1024  # rows cut to this (and to the context length)
    pad_multiple: int = 16  # batch widths rounded up to a multiple (fewer compilations)
    bucket: bool = False  # batches of similar lengths (less padding)
    eval_every: int = 5
    eval_batches: int = 5  # batches of each split per evaluation
    log_every: int = 5
    save_every: int = 100
    keep: int = 2  # checkpoints kept
    sample_count: int = 3  # validation prompts answered at every evaluation (0: none)
    sample_tokens: int = 64
    response_tokens: int = 256  # max_new_tokens of the test responses
    response_batch: int = 8  # prompts per generate call
    responses: bool = True  # answer every test entry after training

    def __post_init__(self) -> None:
        if self.style not in PROMPT_STYLES:
            raise ValueError(f"InstructConfig.style must be one of {PROMPT_STYLES}, "
                             f"got {self.style!r}")
        for name in ("allowed_max_length", "pad_multiple", "eval_every", "eval_batches",
                     "log_every", "save_every", "keep", "sample_tokens", "response_tokens",
                     "response_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"InstructConfig.{name} must be a positive int, got {v!r}")
        if isinstance(self.sample_count, bool) or not isinstance(self.sample_count, int) \
                or self.sample_count < 0:
            raise ValueError(f"InstructConfig.sample_count must be an int >= 0, "
                             f"got {self.sample_count!r}")


@functools.lru_cache(maxsize=4)
def _steps(config: GPTConfig, tc: TrainConfig, trainable: Trainable = None):
    """The jitted train and eval steps, kept per configuration: a resumed run in
    the same process reuses the compiled programs."""
    return (make_train_step(config, tc, trainable=trainable), make_eval_step(config))


@functools.lru_cache(maxsize=4)
def _init_fn(config: GPTConfig, tc: TrainConfig, trainable: Trainable = None):
    """A fresh TrainState from a key (random weights) or from given weights, as
    one compiled program."""
    def init(key, params):
        if params is None:
            params = init_params(config, key, scheme=tc.init)
        return init_train_state(params, tc, trainable=trainable)

    return jax.jit(init)


def _mean_loss(eval_step, params, batches) -> tuple[float, float]:
    """(mean loss over every counted target, the count)."""
    sums = jax.device_get([eval_step(params, b) for b in batches])
    count = float(sum(s["count"] for s in sums))
    return float(sum(s["loss_sum"] for s in sums)) / max(count, 1e-30), count


def finetune_instruct(run_dir, config: GPTConfig, tc: TrainConfig, ic: InstructConfig,
                      tokenizer, entries: Sequence[dict], *, params=None, resume: bool = False,
                      progress: bool = True, data_name: str = "instructions",
                      source: str = "random", stop_at: int | None = None,
                      judge: dict[str, Any] | None = None, fallback: bool = True,
                      trainable: Trainable = None, lora: dict | None = None) -> dict[str, Any]:
    """Fine-tune (or resume) the run in `run_dir` on `entries`; returns the summary.

    `entries` are split 85 / 10 / 5 (train / test / validation, in order).
    `params` are the starting weights (default: `init_params(config)`); they
    are donated to the train step. `source` says where they came from (for
    the record). `stop_at` ends the run early at that step, saving there.
    `judge` is {"url", "model", "timeout"} of a judge endpoint for the test
    responses (see `jaxllm.finetune.judge`). `trainable` selects the leaves
    that train (default all; `jaxllm.lora.TRAINABLE` for adapters), and
    `lora` records the adapters' settings in the run's metadata.
    `fallback=False` refuses a damaged latest checkpoint on resume.
    """
    run_dir = Path(run_dir)
    if judge is not None:
        from jaxllm.finetune.judge import check_judge

        check_judge(judge["url"], judge.get("timeout", 60.0))  # before training, not after
    check_run_folder(run_dir, resume=resume, kind=META_KIND)
    with run_lock(run_dir):
        return _run(run_dir, config, tc, ic, tokenizer, entries, params, resume, progress,
                    data_name, source, stop_at, judge, fallback, trainable, lora)


def _run(run_dir, config, tc, ic, tokenizer, entries, params, resume, progress, data_name,
         source, stop_at, judge, fallback, trainable, lora=None):
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the {tokenizer.name} tokenizer has {tokenizer.vocab_size} ids but the "
                         f"model's vocab_size is {config.vocab_size}")
    train_entries, test_entries, val_entries = split_instructions(entries)
    if not val_entries or not test_entries:
        raise ValueError(f"{len(entries)} entries leave an empty validation or test split; "
                         f"give at least 20")
    collate_kw = dict(allowed_max_length=min(ic.allowed_max_length, config.context_length),
                      mask_prompt=ic.mask_prompt, pad_multiple=ic.pad_multiple,
                      pad_id=tokenizer.eot_id)
    train_ex, val_ex, test_ex = (tokenize_entries(e, tokenizer, ic.style)
                                 for e in (train_entries, val_entries, test_entries))
    cut = {name: sum(len(e.tokens) > collate_kw["allowed_max_length"] for e in examples)
           for name, examples in (("train", train_ex), ("validation", val_ex), ("test", test_ex))}
    if sum(cut.values()):  # as classification data says it
        warnings.warn(f"{data_name}: {sum(cut.values())} entries longer than "
                      f"{collate_kw['allowed_max_length']} tokens were truncated "
                      f"({', '.join(f'{k} {v}' for k, v in cut.items())})", stacklevel=3)
    batches = InstructionBatches(train_ex, tc.batch_size, seed=tc.seed, bucket=ic.bucket,
                                 collate_kwargs=collate_kw)
    train_eval = fixed_batches(train_ex, tc.batch_size, ic.eval_batches, **collate_kw)
    val_eval = fixed_batches(val_ex, tc.batch_size, ic.eval_batches, **collate_kw)
    tokens_per_epoch = sum(int((batches.batch_at(k)["targets"] != -100).sum())
                           for k in range(batches.batches_per_epoch))

    identity = {
        "model": config.to_dict(), "train": dataclasses.asdict(tc), "tokenizer": tokenizer.name,
        "instruct": dataclasses.asdict(ic),
        "data": {"train": len(train_entries), "test": len(test_entries),
                 "validation": len(val_entries), "sha256": entries_digest(entries)},
    }
    if trainable is not None:  # a subset trains (adapters, say): part of what the run is
        identity["trainable"] = trainable if isinstance(trainable, str) else repr(trainable)
    meta = dict(identity, kind=META_KIND, data_name=data_name, source=source,
                tokenizer_dir=tokenizer.directory, batches_per_epoch=batches.batches_per_epoch)
    if lora is not None:
        meta["lora"] = lora
    manager = checkpoint.open_manager(run_dir, keep=ic.keep, create=True)
    log = MetricsLog(run_dir)
    if params is not None:
        check_params(params, config)
    state, latest, saved, changes = start_or_resume(run_dir, manager, identity,
                                                    _init_fn(config, tc, trainable), params,
                                                    seed=tc.seed, resume=resume,
                                                    fallback=fallback)
    start, tokens_seen = int(state.step), int(saved.get("tokens_seen", 0))
    if latest is None:
        log.clear()
    else:
        log.truncate_after(start)
    if changes:  # a longer run than the checkpoint's: its schedule's new total, recorded
        meta["schedule_changes"] = changes
    (run_dir / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    end = tc.total_steps if stop_at is None else min(stop_at, tc.total_steps)
    train_step, eval_step = _steps(config, tc, trainable)
    last_saved = latest
    samples_path = run_dir / "samples.txt"
    if start == 0:
        samples_path.write_text("")

    def evaluate(params, step: int) -> dict[str, Any]:
        train_loss, _ = _mean_loss(eval_step, params, train_eval)
        val_loss, _ = _mean_loss(eval_step, params, val_eval)
        record = {"kind": "eval", "step": step, "tokens": tokens_seen, "train_loss": train_loss,
                  "val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 700.0))}
        shown = val_entries[:ic.sample_count]
        if shown and math.isfinite(val_loss):
            answers, _ = generate_responses(params, config, tokenizer, shown, style=ic.style,
                                            max_new_tokens=ic.sample_tokens,
                                            batch_size=len(shown))
            record["samples"] = answers
            with open(samples_path, "a") as f:
                f.write(f"== step {step} (val loss {val_loss:.3f})\n")
                for e, a in zip(shown, answers):
                    f.write(f"-- {e['instruction']}\n{a}\n")
                f.write("\n")
        log.append([record])
        tqdm.write(f"step {step}: train loss {train_loss:.3f}, val loss {val_loss:.3f}")
        return record

    def diverged(step: int, loss: float) -> TrainingDiverged:
        where = (f"the last good checkpoint is step {last_saved}" if last_saved is not None
                 else "no checkpoint was saved")
        return TrainingDiverged(f"training diverged: loss is {loss} at step {step} ({where})",
                                step, last_saved)

    def save(state, step: int) -> None:
        nonlocal last_saved
        checkpoint.save(manager, state, dict(meta, data_position=step, tokens_seen=tokens_seen))
        last_saved = step

    def record(step: int, m) -> dict[str, Any]:
        nonlocal tokens_seen
        tokens_seen += int(m["count"])
        return {"kind": "train", "step": step, "tokens": tokens_seen, "loss": float(m["loss"]),
                "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"])}

    wall_start = time.perf_counter()
    try:
        state, timing, first_eval = run_steps(
            state, train_step, batches.batch_at, start=start, end=end, log_every=ic.log_every,
            eval_every=ic.eval_every, save_every=ic.save_every, record=record,
            evaluate=evaluate, save=save, log=log, diverged=diverged, progress=progress,
            run_dir=run_dir)
    finally:
        manager.close()
        records = log.read()
        if records:
            plot_losses(records, run_dir / "loss.png", tokens_per_epoch=tokens_per_epoch,
                        title=f"{data_name}: {config.n_layers} layers, emb {config.emb_dim}, "
                              f"{ic.style} prompts",
                        eval_batches=common_batch_count(train_eval, val_eval))
    wall_train = time.perf_counter() - wall_start

    # -- the test split: loss, then a response to every entry --------------------
    params = state.params
    test_loss, test_count = _mean_loss(eval_step, params,
                                       fixed_batches(test_ex, tc.batch_size, None, **collate_kw))
    gen_stats = judged = None
    if ic.responses:
        answers, gen_stats = generate_responses(
            params, config, tokenizer, test_entries, style=ic.style,
            max_new_tokens=ic.response_tokens, batch_size=ic.response_batch)
        out = [dict(e, model_response=a) for e, a in zip(test_entries, answers)]
        (run_dir / "responses.json").write_text(json.dumps(out, indent=2) + "\n")
        if judge is not None:
            judged = _judge(out, judge, ic.style, run_dir)

    evals = [r for r in records if r["kind"] == "eval"]
    first_eval = first_eval or (evals[0] if evals else None)
    last = evals[-1] if evals else {}
    train_time, compile_s, timed_steps = timing.train_s, timing.compile_s, timing.timed_steps
    summary = {
        "run_dir": str(run_dir), "source": source, "style": ic.style,
        "mask_prompt": ic.mask_prompt, "steps": int(state.step), "resumed_from": latest,
        "epochs": int(state.step) / batches.batches_per_epoch,
        "train_entries": len(train_entries), "val_entries": len(val_entries),
        "test_entries": len(test_entries), "target_tokens_seen": tokens_seen,
        "trainable_params": count_trainable(state.params, trainable),
        "total_params": sum(int(x.size) for x in jax.tree.leaves(state.params)),
        "train_wall_s": wall_train, "compile_s": compile_s,
        "steps_per_s": timed_steps / train_time if train_time and timed_steps else None,
        "initial_val_loss": first_eval["val_loss"] if first_eval else None,
        "final_train_loss": last.get("train_loss"), "final_val_loss": last.get("val_loss"),
        "test_loss": test_loss, "test_perplexity": math.exp(min(test_loss, 700.0)),
        "test_target_tokens": int(test_count),
        "responses": gen_stats, "judge": judged, "last_checkpoint": last_saved,
        "wall_s": time.perf_counter() - wall_start,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _judge(out: list[dict], judge: dict[str, Any], style: str, run_dir: Path) -> dict[str, Any]:
    """Scores into responses.json and a summary; an entry the judge failed is
    one line, an unavailable judge a message, neither a failed run."""
    from jaxllm.finetune.judge import JudgeUnavailable, judge_responses

    try:
        result = judge_responses(out, judge["url"], judge["model"], style=style,
                                 timeout=judge.get("timeout", 60.0))
    except JudgeUnavailable as err:
        print(f"judge: {err}; the responses and every other result are kept", file=sys.stderr)
        return {"url": judge["url"], "model": judge["model"], "error": str(err)}
    for number, (entry, s) in enumerate(zip(out, result["scores"])):
        entry["judge_score"] = s["score"]
        if s["error"]:
            entry["judge_error"] = s["error"]
            print(f"judge: test entry {number}: {s['error']}", file=sys.stderr)
    (run_dir / "responses.json").write_text(json.dumps(out, indent=2) + "\n")
    return {k: v for k, v in result.items() if k != "scores"}


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"fine-tuned {s['steps']} steps ({s['epochs']:.2f} epochs, "
             f"{s['target_tokens_seen']:,} target tokens) in {s['train_wall_s']:.1f} s"]
    if s["final_val_loss"] is not None:
        lines.append(f"loss: train {s['final_train_loss']:.3f}, validation "
                     f"{s['final_val_loss']:.3f} (from {s['initial_val_loss']:.3f}); test "
                     f"{s['test_loss']:.3f} (perplexity {s['test_perplexity']:.1f})")
    r = s.get("responses")
    if r:
        lines.append(f"responses: {r['entries']} test entries in {r['seconds']:.1f} s "
                     f"({r['responses_per_s']:.2f} responses/s, {r['new_tokens']:,} tokens)")
    j = s.get("judge")
    if j and "error" in j:
        lines.append(f"judge {j['model']}: {j['error']}")
    elif j:
        mean = f"mean score {j['mean']:.1f}" if j["mean"] is not None else "no score"
        lines.append(f"judge {j['model']}: {mean} ({j['scored']} scored, {j['failed']} failed)")
    lines.append(f"wrote {s['run_dir']}/: metrics.jsonl, loss.png, samples.txt, "
                 + ("responses.json, " if r else "") + "summary.json, "
                 f"checkpoints/{s['last_checkpoint']}")
    return "\n".join(lines)


def prompt_style_of(run_dir) -> str:
    """The prompt style a run was fine-tuned with, by instructions or preferences
    ("alpaca" for other runs, a pretraining run say)."""
    meta = checkpoint.read_meta(run_dir)
    return (meta.get("instruct") or meta.get("dpo") or {}).get("style", "alpaca")


__all__ = ["InstructConfig", "finetune_instruct", "format_summary", "prompt_style_of",
           "format_prompt"]
