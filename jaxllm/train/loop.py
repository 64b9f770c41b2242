"""The one training loop: a task over a batch source, evaluated, logged, saved and resumable.

Every training command runs on it: pretraining (`jaxllm.train.pretrain`),
classification (`jaxllm.finetune.classify_run`), instruction tuning
(`jaxllm.finetune.instruct_run`) and DPO (`jaxllm.finetune.dpo_run`). Each
says what differs: its task (what `make_train_step` minimises), its batch
source (the seeded, resumable order of batches: `batch_at(step)` and
`batches_per_epoch`), its evaluations and the files it writes; this module
does the rest, in two steps:

    with open_run(run_dir, config, tc, identity=..., task=..., params=...) as run:
        # run.state is fresh or resumed; run.resumed_from says which
        done = run.fit(batches, evaluations={"train": Means(...), "val": Means(...)})

`open_run` checks the folder, takes its lock, builds the jitted steps (on a
device mesh if given: the batch split over its devices, the state sharded by
partition rules) and starts the state afresh or restores the newest intact
checkpoint, after checking that the settings that make the run (`identity`)
are those it was saved with. `Run.fit` runs the steps to the end:

- every `log_every` steps, one device->host transfer of the pending step
  metrics into `metrics.jsonl` and the progress bar; a non-finite loss
  stops the run (`TrainingDiverged`), naming the step and the last good
  checkpoint;
- at step 0, every `eval_every` steps and at the end, the evaluations:
  `Means` over fixed batches through the eval step, then the run's own
  functions of the parameters (samples, say), into one record;
- every `save_every` steps, at the end and on SIGINT/SIGTERM, an Orbax
  checkpoint (the last `keep` kept), written only once the parameters are
  finite and give a finite loss on the next batch;
- at the end, however the steps ended, `finish(records)`: the plots.

The batch order is a function of the step and the dropout keys of (seed,
step), so a resumed run writes the losses an uninterrupted one would, bit for
bit. In a multi-host run every process calls the same; all compute and
checkpoint, and process 0 alone writes the run's files.
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
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from jaxllm import lora, sharding
from jaxllm.config import GPTConfig
from jaxllm.model import init_params
from jaxllm.train import checkpoint
from jaxllm.train.lock import run_lock
from jaxllm.train.metrics import MetricsLog
from jaxllm.train.optim import TrainConfig
from jaxllm.train.runner import (Timing, check_resumable, check_run_folder, run_steps,
                                 say_nothing_to_resume)
from jaxllm.train.step import TrainState, init_train_state, make_eval_step, make_train_step
from jaxllm.train.task import Task, Trainable, lm_task

# Step metrics that are not a task's aux sums.
STEP_FIELDS = ("loss", "count", "grad_norm", "lr")


class TrainingDiverged(RuntimeError):
    """The loss (or the parameters) became NaN or infinite."""

    def __init__(self, message: str, step: int, last_checkpoint: int | None):
        super().__init__(message)
        self.step, self.last_checkpoint = step, last_checkpoint


@dataclasses.dataclass(frozen=True)
class Means:
    """An evaluation: the mean loss over fixed `batches`, and the mean of each
    of the task's aux sums (correct predictions, rewards), each over every
    counted item of the batches; with `perplexity`, exp of the mean loss too."""

    batches: Sequence[dict]
    perplexity: bool = False


# An evaluation is `Means` or a function (params, step, record) -> the fields it
# adds, where `record` holds what the evaluations before it found (a text sample
# may need a finite loss).
Evaluation = Any


@dataclasses.dataclass
class Fitted:
    """What `Run.fit` leaves: the final state and what the run recorded."""

    state: TrainState
    records: list[dict[str, Any]]  # metrics.jsonl, the resumed part included
    first_eval: dict[str, Any] | None  # the step-0 evaluation
    last_saved: int | None  # the newest checkpoint's step
    seen: int  # what the run counted (tokens, examples, pairs) up to its last step
    timing: Timing
    wall_s: float  # the steps, evaluations and saves

    @property
    def last_eval(self) -> dict[str, Any]:
        evals = [r for r in self.records if r["kind"] == "eval"]
        return evals[-1] if evals else {}

    @property
    def steps_per_s(self) -> float | None:
        t = self.timing
        return t.timed_steps / t.train_s if t.train_s and t.timed_steps else None


@jax.jit
def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _is_writer() -> bool:
    """Whether this process writes the run's metrics, plots and summary: only
    the first, so that the hosts of a multi-host run do not overwrite each
    other's files in the shared run folder."""
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


@dataclasses.dataclass(frozen=True)
class RandomInit:
    """The starting parameters: the given ones, else `init_params` from the key."""

    config: GPTConfig
    scheme: str

    def __call__(self, key, params):
        return init_params(self.config, key, scheme=self.scheme) if params is None else params


@_maybe_cached
def _init_fn(tc: TrainConfig, optimizer, trainable: Trainable, start: Callable,
             shardings=None):
    """A fresh TrainState from a key and optional starting parameters, as one
    compiled program (eagerly, every parameter shape would compile its own
    random-normal kernel)."""
    def init(key, params):
        return init_train_state(start(key, params), tc, optimizer, trainable=trainable)

    return jax.jit(init, out_shardings=shardings)


def mean_metrics(eval_step, params, sets: Sequence[Sequence[dict]],
                 names: Mapping[str, str] | None = None) -> list[dict[str, float]]:
    """For each set of batches: {"loss", each aux sum under `names`' name for it,
    "count"}, means over every counted item. Every batch is dispatched before
    the one wait for their sums."""
    names = names or {}
    sums = jax.device_get([[eval_step(params, b) for b in batches] for batches in sets])
    out = []
    for split in sums:
        count = float(sum(s["count"] for s in split))
        means = {"loss": float(sum(s["loss_sum"] for s in split)) / max(count, 1e-30)}
        for key in (split[0] if split else {}):
            if key not in ("loss_sum", "count"):
                means[names.get(key, key)] = float(sum(s[key] for s in split)) / max(count, 1e-30)
        out.append(dict(means, count=count))
    return out


class Run:
    """A run folder with its state, fresh or resumed, and the compiled steps
    (from `open_run`); `fit` trains it. `meta` is what its config.json and
    checkpoints record, once `fit` has written it."""

    def __init__(self, run_dir: Path, config: GPTConfig, tc: TrainConfig, *, identity, kind,
                 task, params, start, trainable, optimizer, mesh, partition_rules, resume,
                 fallback, keep, metric_names):
        self.run_dir, self.config, self.tc, self.kind = run_dir, config, tc, kind
        self.identity, self.mesh = identity, mesh
        self.metric_names = dict(metric_names or {})
        self.writer = _is_writer()
        if mesh is not None:
            sharding.check_batch(tc.batch_size, mesh, name="TrainConfig.batch_size")
        elif partition_rules is not None:
            raise ValueError("partition rules need a device mesh (mesh=...)")
        # A rule of the user's that matches no parameter is an error (a typo, most
        # likely); the default rules also name parameters some configs lack.
        self.custom_rules = partition_rules is not None
        rules = tuple(partition_rules) if self.custom_rules else sharding.DEFAULT_RULES
        if params is not None and lora.adapters_of(params)[0]:
            # adapters replicated after the rules, unless a rule shards them
            rules = tuple(lora.sharding_rules(rules))
        self.rules = rules

        self.manager = checkpoint.open_manager(run_dir, keep=keep, create=True)
        self.log = MetricsLog(run_dir, write=self.writer)
        try:
            self._start(params, start, trainable, optimizer, task, resume, fallback)
        except BaseException:  # a refused resume, say: the manager's threads end with it
            self.manager.close()
            raise

    def _start(self, params, start, trainable, optimizer, task, resume, fallback) -> None:
        """The state, fresh or restored, and the compiled steps."""
        run_dir, config, tc, mesh, rules = self.run_dir, self.config, self.tc, self.mesh, \
            self.rules
        identity = self.identity
        latest = self.manager.latest_step()
        if latest is not None and not resume:
            raise ValueError(f"{run_dir} already holds checkpoints (latest step {latest}); "
                             f"resume it (--resume) or choose another run folder")
        if latest is not None:  # a damaged newest checkpoint: the newest intact one
            latest = checkpoint.newest_intact(run_dir, fallback=fallback, manager=self.manager)
        start = start or RandomInit(config, tc.init)
        # The fresh state's shapes are the restore target: a checkpoint restores into
        # whatever tree and optimizer state this run builds (a head, adapters).
        abstract = jax.eval_shape(
            lambda key: _init_fn(tc, optimizer, trainable, start)(key, params),
            jax.random.key(tc.seed))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = (jax.tree.map(lambda _: device, abstract) if mesh is None else
                     sharding.train_state_shardings(abstract, mesh, rules,
                                                    strict=self.custom_rules))
        self.saved: dict[str, Any] = {}
        self.schedule_changes: list[dict[str, Any]] = []
        if latest is not None:
            self.saved = checkpoint.read_meta(run_dir, latest)
            # A longer (or shorter) run is the same run: the schedule is recomputed for
            # the new total from the resumed step on, and config.json records the change.
            self.schedule_changes = check_resumable(run_dir, self.saved, identity, latest)
            saved_total = self.saved.get("train", {}).get("total_steps", tc.total_steps)
            if self.writer:
                print(f"resuming {run_dir} from step {latest}"
                      + (f" (total steps {saved_total} -> {tc.total_steps})"
                         if saved_total != tc.total_steps else ""), file=sys.stderr)
            target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract, shardings)
            self.state = checkpoint.restore(run_dir, latest, target=target).state
            if self.saved.get("data_position") != int(self.state.step):
                raise ValueError(f"checkpoint {latest} has data position "
                                 f"{self.saved.get('data_position')} but step "
                                 f"{int(self.state.step)}")
        else:
            if resume and self.writer:
                say_nothing_to_resume(run_dir)
            # Placed on the devices explicitly, like a restored state, so that fresh and
            # resumed runs hit the same compiled step; sharded, no device holds it all.
            init = _init_fn(tc, optimizer, trainable, start,
                            shardings if mesh is not None else None)
            self.state = init(jax.random.key(tc.seed), params)
            if mesh is None:
                self.state = jax.device_put(self.state, device)
        self.resumed_from = latest
        if mesh is None:
            self.train_step, self.eval_step = _steps(config, tc, optimizer, task, trainable)
        else:
            self.train_step, self.eval_step = _sharded_steps(
                config, tc, optimizer, task, trainable, mesh, rules, self.custom_rules, abstract)

    def means(self, params, *sets: Sequence[dict]) -> list[dict[str, float]]:
        """`mean_metrics` of each set of batches through the run's eval step."""
        return mean_metrics(self.eval_step, params, sets, self.metric_names)

    def write_config(self, meta: dict[str, Any]) -> dict[str, Any]:
        """config.json: the identity, the run's own `meta` and how it is laid out."""
        meta = dict(self.identity, **meta, schedule_changes=self.schedule_changes,
                    mesh=None if self.mesh is None else sharding.mesh_description(self.mesh),
                    partition_rules=(sharding.rules_as_data(self.rules) if self.custom_rules
                                     else None))
        if self.kind is not None:
            meta["kind"] = self.kind
        if self.writer:
            (self.run_dir / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        self.meta = meta
        return meta

    def fit(self, batches, *, meta: dict[str, Any], evaluations: Mapping[str, Evaluation],
            log_every: int, eval_every: int, save_every: int, unit: str = "tokens",
            stop_at: int | None = None, describe: Callable[[dict], str] | None = None,
            finish: Callable[[list[dict]], None] | None = None,
            tokens_per_step: int | None = None, progress: bool = True) -> Fitted:
        """Train from the state's step to `TrainConfig.total_steps` (or `stop_at`).

        `batches` is the batch source (`batch_at(step)` a dict of host arrays,
        `batches_per_epoch`), `meta` what config.json and each checkpoint
        record beside the identity. Each step adds the step's count (tokens,
        examples, pairs: `unit`) to what the run has seen; rows of
        metrics.jsonl carry it. `evaluations` name what each evaluation
        record holds: `Means` give "<name>_loss" and the task's other means
        (`metric_names`), functions the fields they return. `describe(record)`
        is the line an evaluation prints; `finish(records)` writes the plots,
        whatever ended the steps.
        """
        run_dir, tc, log, writer = self.run_dir, self.tc, self.log, self.writer
        start = int(self.state.step)
        if self.resumed_from is None:
            log.clear()  # a fresh run: stale metrics of an unsaved run go
        else:
            log.truncate_after(start)
        meta = self.write_config(dict(meta, batches_per_epoch=batches.batches_per_epoch))
        end = tc.total_steps if stop_at is None else min(stop_at, tc.total_steps)
        seen_key = f"{unit}_seen"
        seen = int(self.saved.get(seen_key, 0))
        last_saved = self.resumed_from
        mesh = self.mesh
        feed_local_rows = mesh is not None and jax.process_count() > 1
        local_rows = sharding.process_rows(mesh, tc.batch_size) if feed_local_rows else None
        means = [(name, e) for name, e in evaluations.items() if isinstance(e, Means)]

        def evaluate(params, step: int) -> dict[str, Any]:
            record = {"kind": "eval", "step": step, unit: seen}
            for (name, e), m in zip(means, self.means(params, *(e.batches for _, e in means))):
                m.pop("count")
                record.update({f"{name}_{k}": v for k, v in m.items()})
                if e.perplexity:
                    record[f"{name}_perplexity"] = math.exp(min(m["loss"], 700.0))
            for e in evaluations.values():
                if not isinstance(e, Means):
                    record.update(e(params, step, record) or {})
            log.append([record])
            if writer and describe is not None:
                tqdm.write(describe(record))
            return record

        def diverged(step: int, what: str) -> TrainingDiverged:
            where = (f"the last good checkpoint is step {last_saved} in "
                     f"{checkpoint.checkpoint_dir(run_dir)}" if last_saved is not None
                     else "no checkpoint was saved")
            return TrainingDiverged(f"training diverged: {what} at step {step}; stopped without "
                                    f"saving it ({where})", step, last_saved)

        def save(state, step: int) -> None:
            nonlocal last_saved
            if not bool(_all_finite(state.params)):
                raise diverged(step, "the parameters are not finite")
            out = self.eval_step(state.params, batches.batch_at(step))
            next_loss = float(out["loss_sum"] / jnp.maximum(out["count"], 1e-30))
            if not math.isfinite(next_loss):
                raise diverged(step, f"the parameters give loss {next_loss} on the next batch")
            checkpoint.save(self.manager, state, dict(meta, data_position=step,
                                                      **{seen_key: seen}))
            last_saved = step

        def batch_at(step: int):
            batch = batches.batch_at(step)  # the data position is the step
            if feed_local_rows:  # each process places only the rows its devices hold
                batch = dict(zip(batch, sharding.shard_batch(
                    mesh, *(v[local_rows] for v in batch.values()), per_process=True)))
            return batch

        def record(step: int, m) -> dict[str, Any]:
            nonlocal seen
            count = float(m["count"])
            seen += int(count)
            aux = {self.metric_names.get(k, k): float(v) / max(count, 1.0)
                   for k, v in m.items() if k not in STEP_FIELDS}
            return {"kind": "train", "step": step, unit: seen, "loss": float(m["loss"]), **aux,
                    "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"])}

        wall_start = time.perf_counter()
        state = self.state
        try:
            state, timing, first_eval = run_steps(
                state, self.train_step, batch_at, start=start, end=end, log_every=log_every,
                eval_every=eval_every, save_every=save_every, record=record,
                evaluate=evaluate, save=save, log=log,
                diverged=lambda step, loss: diverged(step, f"loss is {loss}"),
                progress=progress and writer, tokens_per_step=tokens_per_step, run_dir=run_dir)
        finally:
            self.manager.close()
            records = log.read()
            if records and writer and finish is not None:
                finish(records)
        self.state = state
        evals = [r for r in records if r["kind"] == "eval"]
        return Fitted(state=state, records=records,
                      first_eval=first_eval or (evals[0] if evals else None),
                      last_saved=last_saved, seen=seen, timing=timing,
                      wall_s=time.perf_counter() - wall_start)


@contextlib.contextmanager
def open_run(run_dir, config: GPTConfig, tc: TrainConfig, *, identity: dict[str, Any],
             kind: str | None = None, task: Task = lm_task, params=None,
             start: Callable | None = None, trainable: Trainable = None, optimizer=None,
             mesh: jax.sharding.Mesh | None = None, partition_rules: sharding.Rules | None = None,
             resume: bool = False, fallback: bool = True, keep: int = 3,
             metric_names: Mapping[str, str] | None = None,
             flag: str = "--out") -> Iterator[Run]:
    """The run in `run_dir`, fresh or resumed, held locked while in use.

    `identity` is what makes the run: its model, training and data settings;
    a resume must bring the same (the cadence and the total step count may
    change; see `runner.check_resumable`). `kind` names the run's kind in its
    checkpoints ("classify", "instruct", "dpo"; None: pretraining); resuming
    another kind is refused. `params` are the starting parameters (default:
    `init_params` from the seed), donated to the train step; `start(key,
    params)` builds the starting tree inside the compiled init (a new head,
    say). `trainable` selects the leaves that train (default all) and
    `optimizer` is an optax transformation (default `make_optimizer(tc)`).
    With a `mesh` (`jaxllm.sharding.make_mesh`) the batch is split over its
    devices and the state sharded by the default partition rules (or
    `partition_rules`, which must each match a parameter); checkpoints are
    written in shards and resume onto any mesh. `metric_names` renames the
    task's aux sums in the records ({"correct": "accuracy"}). `fallback=False`
    refuses a damaged newest checkpoint instead of taking the newest intact one.
    """
    run_dir = Path(run_dir)
    check_run_folder(run_dir, resume=resume, kind=kind, flag=flag)
    with run_lock(run_dir) if _is_writer() else contextlib.nullcontext():
        run_dir.mkdir(parents=True, exist_ok=True)
        run = Run(run_dir, config, tc, identity=identity, kind=kind, task=task, params=params,
                  start=start, trainable=trainable, optimizer=optimizer, mesh=mesh,
                  partition_rules=partition_rules, resume=resume, fallback=fallback, keep=keep,
                  metric_names=metric_names)
        try:
            yield run
        finally:
            run.manager.close()


__all__ = ["Fitted", "Means", "Run", "TrainingDiverged", "mean_metrics", "open_run"]
