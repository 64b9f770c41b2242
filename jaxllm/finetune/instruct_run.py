"""The instruction run: entries in, a model that answers, its responses out.

`finetune_instruct(...)` runs the one loop (`jaxllm.train.loop`) with the
masked LM loss (`lm_task`) over collated instruction batches
(`jaxllm.data.instructions`):

- at step 0, every `eval_every` steps and at the end, the mean loss over the
  first `eval_batches` training and validation batches (a mean over every
  counted target) and greedy responses to the first `sample_count`
  validation prompts (`samples.txt`);
- checkpoints with the instruction settings in their metadata, so `jaxllm
  chat` knows the prompt style;
- after training, the loss and perplexity over the whole test split, and a
  greedy KV-cached response to every test entry (`responses.json`, the test
  entries with a `model_response` field), with responses/s; with a `judge`
  (`jaxllm.finetune.judge`), a 0-100 score for each response (`judge_score`
  in responses.json) and their mean; an unreachable judge is reported and
  everything else kept;
- `loss.png` (x is counted target tokens seen) and `summary.json`.

The loop does the rest: logging, NaN stops, the run-folder lock, bitwise
resume, a device mesh.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax

from jaxllm.config import GPTConfig
from jaxllm.data.instructions import (InstructionBatches, entries_digest, fixed_batches,
                                      split_instructions, tokenize_entries)
from jaxllm.finetune.instruct import PROMPT_STYLES, format_prompt, generate_responses
from jaxllm.layout import check_params
from jaxllm.train import checkpoint
from jaxllm.train.loop import Means, open_run
from jaxllm.train.optim import TrainConfig
from jaxllm.train.plot import common_batch_count, plot_losses
from jaxllm.train.task import Trainable, count_trainable

META_KIND = "instruct"


@dataclasses.dataclass(frozen=True)
class AnswerConfig:
    """What runs that teach a model to answer prompts share (instruction tuning,
    DPO): the prompt format, rows, cadence, samples and test responses."""

    style: str = "alpaca"  # prompt format: alpaca or chat
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
    responses: bool = True  # answer every test entry after training

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.style not in PROMPT_STYLES:
            raise ValueError(f"{name}.style must be one of {PROMPT_STYLES}, got {self.style!r}")
        for field in ("allowed_max_length", "pad_multiple", "eval_every", "eval_batches",
                      "log_every", "save_every", "keep", "sample_tokens", "response_tokens",
                      "response_batch"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name}.{field} must be a positive int, got {v!r}")
        if isinstance(self.sample_count, bool) or not isinstance(self.sample_count, int) \
                or self.sample_count < 0:
            raise ValueError(f"{name}.sample_count must be an int >= 0, "
                             f"got {self.sample_count!r}")


@dataclasses.dataclass(frozen=True)
class InstructConfig(AnswerConfig):
    """Data, evaluation, checkpoint and response settings of an instruction run."""

    mask_prompt: bool = False  # train on the response tokens only
    bucket: bool = False  # batches of similar lengths (less padding)


def finetune_instruct(run_dir, config: GPTConfig, tc: TrainConfig, ic: InstructConfig,
                      tokenizer, entries: Sequence[dict], *, params=None, resume: bool = False,
                      progress: bool = True, data_name: str = "instructions",
                      source: str = "random", stop_at: int | None = None,
                      judge: dict[str, Any] | None = None, fallback: bool = True,
                      trainable: Trainable = None, lora: dict | None = None,
                      mesh: jax.sharding.Mesh | None = None,
                      partition_rules=None) -> dict[str, Any]:
    """Fine-tune (or resume) the run in `run_dir` on `entries`; returns the summary.

    `entries` are split 85 / 10 / 5 (train / test / validation, in order).
    `params` are the starting weights (default: `init_params(config)`); they
    are donated to the train step. `source` says where they came from (for
    the record). `stop_at` ends the run early at that step, saving there.
    `judge` is {"url", "model", "timeout"} of a judge endpoint for the test
    responses (see `jaxllm.finetune.judge`). `trainable` selects the leaves
    that train (default all; `jaxllm.lora.TRAINABLE` for adapters), and
    `lora` records the adapters' settings in the run's metadata.
    `fallback=False` refuses a damaged latest checkpoint on resume. With a
    `mesh` the batch is split over its devices and the state sharded (by
    `partition_rules`, default `jaxllm.sharding.DEFAULT_RULES`).
    """
    run_dir, wall_start = Path(run_dir), time.perf_counter()
    if judge is not None:
        from jaxllm.finetune.judge import check_judge

        check_judge(judge["url"], judge.get("timeout", 60.0))  # before training, not after
    train_entries, test_entries, val_entries = answer_splits(entries, tokenizer, config)
    collate_kw = dict(allowed_max_length=min(ic.allowed_max_length, config.context_length),
                      mask_prompt=ic.mask_prompt, pad_multiple=ic.pad_multiple,
                      pad_id=tokenizer.eot_id)
    train_ex, val_ex, test_ex = (tokenize_entries(e, tokenizer, ic.style)
                                 for e in (train_entries, val_entries, test_entries))
    warn_truncated(data_name, collate_kw["allowed_max_length"],
                   train=train_ex, validation=val_ex, test=test_ex)
    batches = InstructionBatches(train_ex, tc.batch_size, seed=tc.seed, bucket=ic.bucket,
                                 collate_kwargs=collate_kw)
    train_eval = fixed_batches(train_ex, tc.batch_size, ic.eval_batches, **collate_kw)
    val_eval = fixed_batches(val_ex, tc.batch_size, ic.eval_batches, **collate_kw)
    tokens_per_epoch = sum(int((batches.batch_at(k)["targets"] != -100).sum())
                           for k in range(batches.batches_per_epoch))
    if params is not None:
        check_params(params, config)

    identity, meta = answer_run_record(
        "instruct", ic, config, tc, tokenizer, entries, (train_entries, test_entries, val_entries),
        trainable=trainable, lora=lora, data_name=data_name, source=source)
    samples_path = run_dir / "samples.txt"

    def samples(params, step: int, record: dict[str, Any]) -> dict[str, Any]:
        return answer_samples(params, config, tokenizer, val_entries[:ic.sample_count], step,
                              record, style=ic.style, max_new_tokens=ic.sample_tokens,
                              path=samples_path, heading=f"val loss {record['val_loss']:.3f}")

    def describe(r: dict[str, Any]) -> str:
        return f"step {r['step']}: train loss {r['train_loss']:.3f}, val loss {r['val_loss']:.3f}"

    def finish(records: list[dict[str, Any]]) -> None:
        plot_losses(records, run_dir / "loss.png", tokens_per_epoch=tokens_per_epoch,
                    title=f"{data_name}: {config.n_layers} layers, emb {config.emb_dim}, "
                          f"{ic.style} prompts",
                    eval_batches=common_batch_count(train_eval, val_eval))

    with open_run(run_dir, config, tc, identity=identity, kind=META_KIND, params=params,
                  trainable=trainable, mesh=mesh, partition_rules=partition_rules,
                  resume=resume, fallback=fallback,
                  keep=ic.keep) as run:
        if run.resumed_from is None:
            samples_path.write_text("")
        done = run.fit(batches, meta=meta, evaluations={
            "train": Means(train_eval), "val": Means(val_eval, perplexity=True),
            "samples": samples}, log_every=ic.log_every, eval_every=ic.eval_every,
            save_every=ic.save_every, unit="tokens", stop_at=stop_at, describe=describe,
            finish=finish, progress=progress)
        # -- the test split: loss, then a response to every entry --------------------
        params = done.state.params
        (test,) = run.means(params, fixed_batches(test_ex, tc.batch_size, None, **collate_kw))
    gen_stats = judged = None
    if ic.responses:
        answers, gen_stats = generate_responses(
            params, config, tokenizer, test_entries, style=ic.style,
            max_new_tokens=ic.response_tokens, batch_size=ic.response_batch)
        out = [dict(e, model_response=a) for e, a in zip(test_entries, answers)]
        (run_dir / "responses.json").write_text(json.dumps(out, indent=2) + "\n")
        if judge is not None:
            judged = _judge(out, judge, ic.style, run_dir)

    first, last, steps = done.first_eval, done.last_eval, int(done.state.step)
    summary = {
        "run_dir": str(run_dir), "source": source, "style": ic.style,
        "mask_prompt": ic.mask_prompt, "steps": steps, "resumed_from": run.resumed_from,
        "epochs": steps / batches.batches_per_epoch,
        "train_entries": len(train_entries), "val_entries": len(val_entries),
        "test_entries": len(test_entries), "target_tokens_seen": done.seen,
        "trainable_params": count_trainable(params, trainable),
        "total_params": sum(int(x.size) for x in jax.tree.leaves(params)),
        "train_wall_s": done.wall_s, "compile_s": done.timing.compile_s,
        "steps_per_s": done.steps_per_s,
        "initial_val_loss": first["val_loss"] if first else None,
        "final_train_loss": last.get("train_loss"), "final_val_loss": last.get("val_loss"),
        "test_loss": test["loss"], "test_perplexity": math.exp(min(test["loss"], 700.0)),
        "test_target_tokens": int(test["count"]),
        "responses": gen_stats, "judge": judged, "last_checkpoint": done.last_saved,
        "wall_s": time.perf_counter() - wall_start,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def answer_run_record(section: str, settings: AnswerConfig, config: GPTConfig,
                      tc: TrainConfig, tokenizer, entries: Sequence[dict], splits, *,
                      trainable: Trainable, lora: dict | None, data_name: str,
                      source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(identity, meta) of a run on prompt entries: what a resume must bring
    again (the model, training and `section`'s settings, the tokenizer, the
    splits' sizes and the data's digest, the trainable subset) and what the
    run records beside it (where data, weights and tokenizer came from, LoRA)."""
    train, test, validation = splits
    identity = {
        "model": config.to_dict(), "train": dataclasses.asdict(tc), "tokenizer": tokenizer.name,
        section: dataclasses.asdict(settings),
        "data": {"train": len(train), "test": len(test), "validation": len(validation),
                 "sha256": entries_digest(entries)},
    }
    if trainable is not None:  # a subset trains (adapters, say): part of what the run is
        identity["trainable"] = trainable if isinstance(trainable, str) else repr(trainable)
    meta = dict(data_name=data_name, source=source, tokenizer_dir=tokenizer.directory)
    if lora is not None:
        meta["lora"] = lora
    return identity, meta


def answer_splits(entries: Sequence[dict], tokenizer, config: GPTConfig):
    """(train, test, validation) of a run on prompt entries (85 / 10 / rest, in file
    order), once the tokenizer's ids fit the model and every split has entries."""
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the {tokenizer.name} tokenizer has {tokenizer.vocab_size} ids but the "
                         f"model's vocab_size is {config.vocab_size}")
    train, test, validation = split_instructions(entries)
    if not validation or not test:
        raise ValueError(f"{len(entries)} entries leave an empty validation or test split; "
                         f"give at least 20")
    return train, test, validation


def warn_truncated(data_name: str, limit: int, **splits) -> None:
    """One warning for the examples of every split longer than `limit` tokens,
    as classification data says it."""
    cut = {name: sum(len(e.tokens) > limit for e in examples)
           for name, examples in splits.items()}
    if sum(cut.values()):
        warnings.warn(f"{data_name}: {sum(cut.values())} entries longer than {limit} tokens "
                      f"were truncated ({', '.join(f'{k} {v}' for k, v in cut.items())})",
                      stacklevel=3)


def answer_samples(params, config: GPTConfig, tokenizer, shown: Sequence[dict], step: int,
                   record: dict[str, Any], *, style: str, max_new_tokens: int, path: Path,
                   heading: str) -> dict[str, Any]:
    """An evaluation: greedy answers to the `shown` prompts where the validation
    loss is finite, as the record's "samples" and appended to `path`."""
    if not shown or not math.isfinite(record["val_loss"]):
        return {}
    answers, _ = generate_responses(params, config, tokenizer, shown, style=style,
                                    max_new_tokens=max_new_tokens, batch_size=len(shown))
    with open(path, "a") as f:
        f.write(f"== step {step} ({heading})\n")
        for e, a in zip(shown, answers):
            f.write(f"-- {e['instruction']}\n{a}\n")
        f.write("\n")
    return {"samples": answers}


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


__all__ = ["AnswerConfig", "InstructConfig", "finetune_instruct", "format_summary", "prompt_style_of",
           "format_prompt"]
