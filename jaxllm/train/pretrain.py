"""Pretraining: a token stream in, a trained, saved, resumable language model out.

`train(...)` runs the one loop (`jaxllm.train.loop`) with the next-token loss
over sliding windows of a token stream (or random windows of a token file):
at step 0, every `eval_every` steps and at the end, the mean loss over a
fixed set of training and validation batches, the validation perplexity, and
a greedy and a temperature sample from a fixed prompt; at the end,
`loss.png` (loss against tokens seen), `samples.txt`, `summary.json` and a
printed summary. The loop does the rest: logging, NaN stops, checkpoints,
the run-folder lock, bitwise resume, a device mesh.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np

from jaxllm import sharding
from jaxllm.config import GPTConfig
from jaxllm.data.token_file import RandomWindowBatches
from jaxllm.data.windows import SlidingWindows, WindowBatches, split_tokens
from jaxllm.tokenizer import Tokenizer
from jaxllm.train.loop import Means, TrainingDiverged, open_run
from jaxllm.train.metrics import write_samples
from jaxllm.train.optim import TrainConfig
from jaxllm.train.plot import common_batch_count, plot_losses
from jaxllm.train.sampling import sample_text
from jaxllm.train.task import Task, Trainable, lm_batch, lm_task

META_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Data windows, evaluation, logging and checkpoint settings of a pretraining run."""

    max_length: int | None = None  # tokens per training window; None: the context length
    stride: int | None = None  # tokens between window starts; None: max_length
    train_ratio: float = 0.9  # leading share of the token stream used for training
    shuffle: bool = True  # shuffle the windows each epoch (by TrainConfig.seed)
    random_windows: bool = False  # draw windows at random offsets instead (large corpora)
    eval_every: int = 100
    eval_batches: int = 10  # fixed batches per evaluation, from each split
    log_every: int = 10  # steps between device->host metric transfers
    save_every: int = 500
    keep: int = 3  # checkpoints kept
    sample_prompt: str = "Every effort moves you"
    sample_tokens: int = 50
    sample_every: int | None = None  # steps between text samples; None: at every evaluation
    temperature: float = 0.8  # of the second sample (0: greedy sample only)

    def __post_init__(self) -> None:
        for name in ("eval_every", "eval_batches", "log_every", "save_every", "keep",
                     "sample_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"LoopConfig.{name} must be a positive int, got {v!r}")
        for name in ("max_length", "stride"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
                raise ValueError(f"LoopConfig.{name} must be a positive int or None, got {v!r}")
        if not 0.0 < self.train_ratio < 1.0:
            raise ValueError(f"LoopConfig.train_ratio must be in (0, 1), got {self.train_ratio!r}")
        if self.sample_every is not None and (isinstance(self.sample_every, bool) or not
                                              isinstance(self.sample_every, int)
                                              or self.sample_every <= 0):
            raise ValueError(f"LoopConfig.sample_every must be a positive int or None, "
                             f"got {self.sample_every!r}")
        if not self.temperature >= 0:
            raise ValueError(f"LoopConfig.temperature must be >= 0, got {self.temperature!r}")

    def replace(self, **changes) -> "LoopConfig":
        return dataclasses.replace(self, **changes)


class Batches:
    """A window source's batches as the dicts a task reads (`make_batch`)."""

    def __init__(self, windows, make_batch: Callable = lm_batch):
        self.windows, self.make_batch = windows, make_batch
        self.batches_per_epoch = windows.batches_per_epoch

    def batch_at(self, step: int) -> dict:
        return self.make_batch(*self.windows.batch_at(step))


def _fixed_batches(tokens, length: int, batch_size: int, count: int, name: str,
                   make_batch: Callable = lm_batch):
    """The first `count` batches of non-overlapping windows, in order."""
    windows = SlidingWindows(tokens, length, length, name=name)
    batches = WindowBatches(windows, batch_size, shuffle=False, drop_last=False)
    return [make_batch(*batches.batch_at(k)) for k in range(min(count, len(batches)))]


def train(run_dir, config: GPTConfig, tc: TrainConfig, lc: LoopConfig, tokenizer: Tokenizer,
          tokens: np.ndarray, *, val_tokens: np.ndarray | None = None, data_name: str = "corpus",
          resume: bool = False, stop_at: int | None = None, progress: bool = True,
          mesh: jax.sharding.Mesh | None = None,
          partition_rules: sharding.Rules | None = None, params=None, task: Task = lm_task,
          trainable: Trainable = None, optimizer=None, fallback: bool = True,
          make_batch: Callable[[np.ndarray, np.ndarray], dict] = lm_batch,
          lora_record: dict | None = None) -> dict[str, Any]:
    """Train (or resume) the run in `run_dir`; returns the summary dict.

    `params` are the starting parameters (a pretrained model, say; default: a
    fresh `init_params`), `task` the loss (default `lm_task`) over the batches
    `make_batch(tokens, targets)` builds from each batch of windows (default
    `lm_batch`: {"tokens", "targets"}; a task of your own adds its keys there,
    a mask say), `trainable` the leaves to train (default all) and `optimizer`
    an optax transformation (default `make_optimizer(tc)`); a resumed run must
    pass the same. `lora_record` is the record of the adapters' settings that
    `params` carry (`jaxllm.cli.lora.lora_start`), kept in the run's metadata.

    `tokens` is the token stream; unless `val_tokens` is given, its first
    `lc.train_ratio` trains and the rest validates. `stop_at` ends the run
    early at that step (saving a checkpoint there), as an interruption would.
    Raises `TrainingDiverged` on a non-finite loss, with the last good
    checkpoint left in place. With a `mesh` (`jaxllm.sharding.make_mesh`) the
    batch is split over its devices and the state sharded by the default
    partition rules (or `partition_rules`, which must each match a parameter);
    checkpoints are written in shards and resume onto any mesh and layout.
    In a multi-host run every process calls `train` with the same arguments;
    all of them compute and checkpoint, and process 0 alone writes the
    metrics, plots, samples and summary (the others return the summary of
    their own view).
    """
    run_dir = Path(run_dir)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the {tokenizer.name} tokenizer has {tokenizer.vocab_size} ids but the "
                         f"model's vocab_size is {config.vocab_size}")
    length = lc.max_length or config.context_length
    if length > config.context_length:
        raise ValueError(f"max_length {length} exceeds the context length {config.context_length}")
    if val_tokens is None:
        tokens, val_tokens = split_tokens(tokens, lc.train_ratio)

    if lc.random_windows:
        windows = RandomWindowBatches(tokens, length, tc.batch_size, seed=tc.seed,
                                      name="training split")
    else:
        windows = WindowBatches(SlidingWindows(tokens, length, lc.stride or length,
                                               name="training split"),
                                tc.batch_size, shuffle=lc.shuffle, seed=tc.seed)
    batches = Batches(windows, make_batch)
    train_eval = _fixed_batches(tokens, length, tc.batch_size, lc.eval_batches, "training split",
                                make_batch)
    val_eval = _fixed_batches(val_tokens, length, tc.batch_size, lc.eval_batches,
                              "validation split", make_batch)
    tokens_per_step = tc.batch_size * length
    identity = {
        "model": config.to_dict(), "train": dataclasses.asdict(tc), "tokenizer": tokenizer.name,
        "data": {"train_tokens": int(len(tokens)), "val_tokens": int(len(val_tokens)),
                 "max_length": length, "stride": lc.stride or length, "shuffle": lc.shuffle,
                 "random_windows": lc.random_windows, "eval_batches": lc.eval_batches},
    }
    meta = dict(format=META_FORMAT, data_name=data_name, tokenizer_dir=tokenizer.directory,
                loop=dataclasses.asdict(lc), tokens_per_step=tokens_per_step)
    if lora_record is not None:
        meta["lora"] = lora_record
    end = tc.total_steps if stop_at is None else min(stop_at, tc.total_steps)
    sample_key = jax.random.key(tc.seed + 1)

    def samples(params, step: int, record: dict[str, Any]) -> dict[str, Any]:
        """A greedy and a temperature sample from the prompt, where the losses are finite."""
        out: dict[str, Any] = {"temperature": lc.temperature}
        due = step == end or lc.sample_every is None or step % lc.sample_every == 0
        if due and math.isfinite(record["train_loss"]) and math.isfinite(record["val_loss"]):
            out["sample_greedy"] = sample_text(params, config, tokenizer, lc.sample_prompt,
                                               lc.sample_tokens)
            if lc.temperature > 0:
                out["sample_temperature"] = sample_text(
                    params, config, tokenizer, lc.sample_prompt, lc.sample_tokens,
                    temperature=lc.temperature, key=jax.random.fold_in(sample_key, step))
        return out

    def describe(r: dict[str, Any]) -> str:
        line = (f"step {r['step']}: train loss {r['train_loss']:.3f}, val loss "
                f"{r['val_loss']:.3f}, val perplexity {r['val_perplexity']:.1f}")
        return line + ("\n  " + repr(r["sample_greedy"])[:160] if "sample_greedy" in r else "")

    def finish(records: list[dict[str, Any]]) -> None:
        plot_losses(records, run_dir / "loss.png",
                    tokens_per_epoch=batches.batches_per_epoch * tokens_per_step,
                    title=f"{data_name}: {config.n_layers} layers, emb {config.emb_dim}, "
                          f"{tokenizer.name} tokens",
                    eval_batches=common_batch_count(train_eval, val_eval))
        write_samples(records, run_dir / "samples.txt")

    with open_run(run_dir, config, tc, identity=identity, task=task, params=params,
                  trainable=trainable, optimizer=optimizer, mesh=mesh,
                  partition_rules=partition_rules, resume=resume, fallback=fallback,
                  keep=lc.keep) as run:
        done = run.fit(batches, meta=meta, evaluations={
            "train": Means(train_eval), "val": Means(val_eval, perplexity=True),
            "samples": samples}, log_every=lc.log_every, eval_every=lc.eval_every,
            save_every=lc.save_every, unit="tokens", stop_at=stop_at, describe=describe,
            finish=finish, tokens_per_step=tokens_per_step, progress=progress)

    steps, last, timing = int(done.state.step), done.last_eval, done.timing
    summary = {
        "run_dir": str(run_dir), "steps": steps, "resumed_from": run.resumed_from,
        "tokens_seen": steps * tokens_per_step,
        "epochs": steps / batches.batches_per_epoch,
        "wall_s": done.wall_s, "compile_s": timing.compile_s,
        "train_tokens_per_s": (timing.timed_steps * tokens_per_step / timing.train_s
                               if timing.train_s else None),
        "initial_val_loss": done.first_eval["val_loss"] if done.first_eval else None,
        "final_train_loss": last.get("train_loss"), "final_val_loss": last.get("val_loss"),
        "final_val_perplexity": last.get("val_perplexity"),
        "last_checkpoint": done.last_saved,
    }
    if run.writer:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(s: dict[str, Any]) -> str:
    rate = f"{s['train_tokens_per_s']:,.0f} tokens/s" if s["train_tokens_per_s"] else "n/a"
    lines = [
        f"trained {s['steps']} steps ({s['tokens_seen']:,} tokens, {s['epochs']:.2f} epochs) "
        f"in {s['wall_s']:.1f} s, {rate} while training",
        f"loss: train {s['final_train_loss']:.3f}, validation {s['final_val_loss']:.3f} "
        f"(perplexity {s['final_val_perplexity']:.1f})" if s["final_val_loss"] is not None else "",
        f"wrote {s['run_dir']}/: metrics.jsonl, loss.png, samples.txt, summary.json, "
        f"checkpoints/{s['last_checkpoint']}",
    ]
    return "\n".join(line for line in lines if line)


__all__ = ["LoopConfig", "TrainingDiverged", "format_summary", "train"]
