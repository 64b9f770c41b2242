"""The pretraining loop: batches in, a trained, saved, resumable model out.

`train(...)` runs `TrainConfig.total_steps` optimizer steps of the jitted,
donated train step over sliding windows of a token stream (or random
windows of a token file), and around them:

- every `log_every` steps, one device->host transfer of the pending step
  metrics, appended to `metrics.jsonl` and shown on a tqdm bar (loss,
  tokens/s, ETA); non-finite loss stops the run, naming the step;
- every `eval_every` steps (and at step 0 and at the end), the mean loss over a
  fixed set of training and validation batches, the validation perplexity,
  and a greedy and a temperature sample from a fixed prompt;
- every `save_every` steps and at the end, an Orbax checkpoint (the last
  `keep` are kept), written only after checking that the parameters are
  finite and give a finite loss on the next batch;
- at the end, `loss.png` (loss against tokens seen), `samples.txt`,
  `summary.json` and a printed summary;
- throughout, a lock on the run folder (`jaxllm.train.lock`): a second run
  started on the same folder is refused at once.

The batch order is a function of the step (see `jaxllm.data.windows`) and the
dropout keys of (seed, step), so a run resumed from a checkpoint writes the
same losses, bit for bit, as one that was never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxllm import lora, sharding
from jaxllm.config import GPTConfig
from jaxllm.data.token_file import RandomWindowBatches
from jaxllm.data.windows import SlidingWindows, WindowBatches, split_tokens
from jaxllm.model import init_params
from jaxllm.tokenizer import Tokenizer
from jaxllm.train import checkpoint
from jaxllm.train.lock import run_lock
from jaxllm.train.metrics import MetricsLog, write_samples
from jaxllm.train.optim import TrainConfig
from jaxllm.train.plot import common_batch_count, plot_losses
from jaxllm.train.sampling import sample_text
from jaxllm.train.runner import (check_resumable, check_run_folder, run_steps,
                                 say_nothing_to_resume)
from jaxllm.train.step import init_train_state, make_eval_step, make_train_step
from jaxllm.train.task import Task, Trainable, lm_batch, lm_task

META_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Data windows, evaluation, logging and checkpoint settings of a run."""

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


class TrainingDiverged(RuntimeError):
    """The loss (or the parameters) became NaN or infinite."""

    def __init__(self, message: str, step: int, last_checkpoint: int | None):
        super().__init__(message)
        self.step, self.last_checkpoint = step, last_checkpoint


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _is_writer() -> bool:
    """Whether this process writes the run's metrics, plots, samples and summary:
    only the first, so that the hosts of a multi-host run do not overwrite
    each other's files in the shared run folder."""
    return jax.process_index() == 0


def _maybe_cached(fn):
    """`fn` memoised on its arguments when they are all hashable (a trainable mask
    given as a pytree is not): runs in one process, a resume say, then reuse
    the compiled steps."""
    cached = functools.lru_cache(maxsize=8)(fn)

    def call(*args):
        try:
            hash(args)
        except TypeError:
            return fn(*args)
        return cached(*args)

    return call


@_maybe_cached
def _steps(config: GPTConfig, tc: TrainConfig, optimizer=None, task: Task = lm_task,
           trainable: Trainable = None):
    """The jitted train and eval steps."""
    return (make_train_step(config, tc, optimizer, task=task, trainable=trainable),
            make_eval_step(config, task=task))


@_maybe_cached
def _sharded_steps(config: GPTConfig, tc: TrainConfig, optimizer, task: Task,
                   trainable: Trainable, mesh: jax.sharding.Mesh, rules, strict: bool, abstract):
    """The train and eval steps on a device mesh (batch split, FSDP state)."""
    with warnings.catch_warnings():  # unmatched parameters were warned of with the state's
        warnings.filterwarnings("ignore", message=".*match no partition rule")
        step = sharding.make_sharded_train_step(config, tc, mesh, rules, optimizer, task=task,
                                                trainable=trainable, strict=strict,
                                                state=abstract)
    return step, sharding.make_sharded_eval_step(config, mesh, step.state_shardings.params,
                                                 task=task)


@_maybe_cached
def _init_fn(config: GPTConfig, tc: TrainConfig, optimizer, trainable: Trainable, shardings=None):
    """A fresh TrainState from a key and optional starting parameters, as one
    compiled program (eagerly, every parameter shape would compile its own
    random-normal kernel)."""
    def init(key, params):
        if params is None:
            params = init_params(config, key, scheme=tc.init)
        return init_train_state(params, tc, optimizer, trainable=trainable)

    return jax.jit(init, out_shardings=shardings)


def _fixed_batches(tokens, length: int, batch_size: int, count: int, name: str,
                   make_batch: Callable = lm_batch):
    """The first `count` batches of non-overlapping windows, in order."""
    windows = SlidingWindows(tokens, length, length, name=name)
    batches = WindowBatches(windows, batch_size, shuffle=False, drop_last=False)
    return [make_batch(*batches.batch_at(k)) for k in range(min(count, len(batches)))]


def _one_writer(fn):
    """Run `fn(run_dir, ...)` holding the run folder's lock (process 0 of a
    multi-host run takes it for all of them), once the folder is checked
    (`check_run_folder`: a file, another run's results, ...)."""
    @functools.wraps(fn)
    def locked(run_dir, *args, **kwargs):
        check_run_folder(run_dir, resume=kwargs.get("resume", False))
        with run_lock(run_dir) if _is_writer() else contextlib.nullcontext():
            return fn(run_dir, *args, **kwargs)

    return locked


@_one_writer
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
    writer = _is_writer()
    run_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the {tokenizer.name} tokenizer has {tokenizer.vocab_size} ids but the "
                         f"model's vocab_size is {config.vocab_size}")
    length = lc.max_length or config.context_length
    if length > config.context_length:
        raise ValueError(f"max_length {length} exceeds the context length {config.context_length}")
    if val_tokens is None:
        tokens, val_tokens = split_tokens(tokens, lc.train_ratio)
    if mesh is not None:
        sharding.check_batch(tc.batch_size, mesh, name="TrainConfig.batch_size")
    elif partition_rules is not None:
        raise ValueError("partition rules need a device mesh (mesh=...)")
    # A rule of the user's that matches no parameter is an error (a typo, most
    # likely); the default rules also name parameters some configs lack.
    custom_rules = partition_rules is not None
    rules = tuple(partition_rules) if custom_rules else sharding.DEFAULT_RULES
    if not custom_rules and params is not None and lora.adapters_of(params)[0]:
        rules = tuple(lora.sharding_rules())  # adapters replicated, not warned of

    # -- data ----------------------------------------------------------------
    if lc.random_windows:
        batches = RandomWindowBatches(tokens, length, tc.batch_size, seed=tc.seed,
                                      name="training split")
    else:
        windows = SlidingWindows(tokens, length, lc.stride or length, name="training split")
        batches = WindowBatches(windows, tc.batch_size, shuffle=lc.shuffle, seed=tc.seed)
    train_eval = _fixed_batches(tokens, length, tc.batch_size, lc.eval_batches, "training split",
                                make_batch)
    val_eval = _fixed_batches(val_tokens, length, tc.batch_size, lc.eval_batches,
                              "validation split", make_batch)
    tokens_per_step = tc.batch_size * length

    # -- state: fresh or resumed -----------------------------------------------
    identity = {
        "model": config.to_dict(), "train": dataclasses.asdict(tc), "tokenizer": tokenizer.name,
        "data": {"train_tokens": int(len(tokens)), "val_tokens": int(len(val_tokens)),
                 "max_length": length, "stride": lc.stride or length, "shuffle": lc.shuffle,
                 "random_windows": lc.random_windows, "eval_batches": lc.eval_batches},
    }
    manager = checkpoint.open_manager(run_dir, keep=lc.keep, create=True)
    log = MetricsLog(run_dir, write=writer)
    latest = manager.latest_step()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if latest is not None and not resume:
        raise ValueError(f"{run_dir} already holds checkpoints (latest step {latest}); resume it "
                         f"(--resume) or choose another run folder")
    if latest is not None:  # a damaged newest checkpoint: the newest intact one
        latest = checkpoint.newest_intact(run_dir, fallback=fallback, manager=manager)
    # The fresh state's shapes are the restore target: a checkpoint restores into
    # whatever tree and optimizer state this run builds (extra heads, adapters).
    abstract = jax.eval_shape(lambda key: _init_fn(config, tc, optimizer, trainable)(key, params),
                              jax.random.key(tc.seed))
    shardings = (jax.tree.map(lambda _: device, abstract) if mesh is None else
                 sharding.train_state_shardings(abstract, mesh, rules, strict=custom_rules))
    if latest is not None:
        saved = checkpoint.read_meta(run_dir, latest)
        # A longer (or shorter) run is the same run: the schedule is recomputed for the
        # new total from the resumed step on, and config.json records the change.
        schedule_changes = check_resumable(run_dir, saved, identity, latest)
        saved_total = saved.get("train", {}).get("total_steps", tc.total_steps)
        if writer:
            print(f"resuming {run_dir} from step {latest}"
                  + (f" (total steps {saved_total} -> {tc.total_steps})"
                     if saved_total != tc.total_steps else ""), file=sys.stderr)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, shardings)
        state = checkpoint.restore(run_dir, latest, target=target).state
        start = int(state.step)
        if saved.get("data_position") != start:
            raise ValueError(f"checkpoint {latest} has data position {saved.get('data_position')} "
                             f"but step {start}")
        log.truncate_after(start)
    else:
        if resume and writer:
            say_nothing_to_resume(run_dir)
        # Placed on the devices explicitly, like a restored state, so that fresh
        # and resumed runs hit the same compiled step; sharded, no device ever
        # holds the whole state.
        init = _init_fn(config, tc, optimizer, trainable, shardings if mesh is not None else None)
        state = init(jax.random.key(tc.seed), params)
        if mesh is None:
            state = jax.device_put(state, device)
        start = 0
        log.clear()  # a fresh run: stale metrics of an unsaved run go
    if latest is None:
        schedule_changes = []
    meta = dict(identity, format=META_FORMAT, schedule_changes=schedule_changes, data_name=data_name,
                tokenizer_dir=tokenizer.directory,
                loop=dataclasses.asdict(lc), tokens_per_step=tokens_per_step,
                batches_per_epoch=batches.batches_per_epoch,
                mesh=None if mesh is None else sharding.mesh_description(mesh),
                partition_rules=sharding.rules_as_data(rules) if custom_rules else None)
    if lora_record is not None:
        meta["lora"] = lora_record
    if writer:
        (run_dir / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    end = tc.total_steps if stop_at is None else min(stop_at, tc.total_steps)

    train_step, eval_step = _steps(config, tc, optimizer, task, trainable) if mesh is None else \
        _sharded_steps(config, tc, optimizer, task, trainable, mesh, rules, custom_rules,
                       abstract)
    feed_local_rows = mesh is not None and jax.process_count() > 1
    local_rows = sharding.process_rows(mesh, tc.batch_size) if feed_local_rows else None
    sample_key = jax.random.key(tc.seed + 1)
    last_saved = latest

    def evaluate(params, step: int, final: bool = False) -> dict[str, Any]:
        # every batch dispatched before the one wait for their sums; the mean is
        # over every counted target of the split
        sums = jax.device_get([[eval_step(params, batch) for batch in split]
                               for split in (train_eval, val_eval)])
        train_loss, val_loss = (
            float(sum(r["loss_sum"] for r in split) / max(sum(r["count"] for r in split), 1e-30))
            for split in sums)
        record = {"kind": "eval", "step": step, "tokens": step * tokens_per_step,
                  "train_loss": train_loss, "val_loss": val_loss,
                  "val_perplexity": math.exp(min(val_loss, 700.0)),
                  "temperature": lc.temperature}
        due = final or lc.sample_every is None or step % lc.sample_every == 0
        if due and math.isfinite(train_loss) and math.isfinite(val_loss):
            record["sample_greedy"] = sample_text(
                params, config, tokenizer, lc.sample_prompt, lc.sample_tokens)
            if lc.temperature > 0:
                record["sample_temperature"] = sample_text(
                    params, config, tokenizer, lc.sample_prompt, lc.sample_tokens,
                    temperature=lc.temperature, key=jax.random.fold_in(sample_key, step))
        log.append([record])
        if not writer:
            return record
        tqdm.write(f"step {step}: train loss {train_loss:.3f}, val loss {val_loss:.3f}, "
                  f"val perplexity {record['val_perplexity']:.1f}")
        if "sample_greedy" in record:
            tqdm.write("  " + repr(record["sample_greedy"])[:160])
        return record

    def diverged(step: int, what: str) -> TrainingDiverged:
        where = (f"the last good checkpoint is step {last_saved} in {checkpoint.checkpoint_dir(run_dir)}"
                 if last_saved is not None else "no checkpoint was saved")
        return TrainingDiverged(f"training diverged: {what} at step {step}; stopped without "
                                f"saving it ({where})", step, last_saved)

    def save(state, step: int) -> None:
        nonlocal last_saved
        if not bool(_all_finite(state.params)):
            raise diverged(step, "the parameters are not finite")
        out = eval_step(state.params, make_batch(*batches.batch_at(step)))
        next_loss = float(out["loss_sum"] / out["count"])
        if not math.isfinite(next_loss):
            raise diverged(step, f"the parameters give loss {next_loss} on the next batch")
        checkpoint.save(manager, state, dict(meta, data_position=step,
                                             tokens_seen=step * tokens_per_step))
        last_saved = step

    def batch_at(step: int):
        batch = make_batch(*batches.batch_at(step))  # the data position is the step
        if feed_local_rows:  # each process places only the rows its devices hold
            batch = dict(zip(batch, sharding.shard_batch(
                mesh, *(v[local_rows] for v in batch.values()), per_process=True)))
        return batch

    def record(step: int, m) -> dict[str, Any]:
        return {"kind": "train", "step": step, "tokens": step * tokens_per_step,
                "loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]),
                "lr": float(m["lr"])}

    wall_start = time.perf_counter()
    try:
        state, timing, first_eval = run_steps(
            state, train_step, batch_at, start=start, end=end, log_every=lc.log_every,
            eval_every=lc.eval_every, save_every=lc.save_every, record=record,
            evaluate=lambda params, step: evaluate(params, step, final=step == end),
            save=save, log=log, diverged=lambda step, loss: diverged(step, f"loss is {loss}"),
            progress=progress and writer, tokens_per_step=tokens_per_step,
            run_dir=run_dir)
        if last_saved != int(state.step) and end > start:
            save(state, int(state.step))
    finally:
        manager.close()
        records = log.read()
        if records and writer:
            plot_losses(records, run_dir / "loss.png",
                        tokens_per_epoch=batches.batches_per_epoch * tokens_per_step,
                        title=f"{data_name}: {config.n_layers} layers, emb {config.emb_dim}, "
                              f"{tokenizer.name} tokens",
                        eval_batches=common_batch_count(train_eval, val_eval))
            write_samples(records, run_dir / "samples.txt")

    evals = [r for r in records if r["kind"] == "eval"]
    first_eval = first_eval or (evals[0] if evals else None)
    last = evals[-1] if evals else {}
    summary = {
        "run_dir": str(run_dir), "steps": int(state.step), "resumed_from": latest,
        "tokens_seen": int(state.step) * tokens_per_step,
        "epochs": int(state.step) / batches.batches_per_epoch,
        "wall_s": time.perf_counter() - wall_start,
        "compile_s": timing.compile_s,
        "train_tokens_per_s": (timing.timed_steps * tokens_per_step / timing.train_s
                               if timing.train_s else None),
        "initial_val_loss": first_eval["val_loss"] if first_eval else None,
        "final_train_loss": last.get("train_loss"), "final_val_loss": last.get("val_loss"),
        "final_val_perplexity": last.get("val_perplexity"),
        "last_checkpoint": last_saved,
    }
    if writer:
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
