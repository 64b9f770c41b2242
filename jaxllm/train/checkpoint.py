"""Checkpoints of a training run, written with Orbax.

A run folder holds `checkpoints/<step>/` with three items:

- `params`: the parameter pytree (restorable on its own, for inference);
- `train`: the step counter, optimizer state and dropout RNG key;
- `meta`: JSON with the model, train and loop configs, the tokenizer name,
  the data description and position (batches consumed) and tokens seen.

Orbax writes each checkpoint into a temporary folder and renames it when
complete, so a run killed during a save leaves only a `*.orbax-checkpoint-tmp*`
folder, which is ignored (and cleaned up): resuming picks the last complete
step. Saves are synchronous, so a saved state is on disk before training
goes on.

A checkpoint restores what it saved, whatever the tree (a new head, adapter
leaves) and the optimizer: `restore` reads the saved tree's own metadata, or
fills a target state that the caller builds (`abstract_state` of their own
init, with shardings for a mesh). Nothing is rebuilt from `init_params`.

Each saved step also gets `files.json`, the size and CRC-32 of every file
in it, so that a truncated or overwritten file is found before Orbax reads
it: `CheckpointDamaged` names the checkpoint and the file in one line.
Resuming (`newest_intact`) and `load_params` then fall back to the newest
checkpoint that is intact, and say so; damaged ones are moved to
`<run>/damaged/<step>`, kept for inspection but out of the run's way.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zlib
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import orbax.checkpoint as ocp

from jaxllm.config import GPTConfig
from jaxllm.model import init_params
from jaxllm.train.optim import TrainConfig
from jaxllm.train.step import TrainState, init_train_state
from jaxllm.train.task import Trainable
from jaxllm.tree import path_str

CHECKPOINT_SUBDIR = "checkpoints"
DAMAGED_SUBDIR = "damaged"
FILES_RECORD = "files.json"
ITEMS = ("params", "train", "meta")
# GPTConfig fields that change how the same function is computed, not what it
# computes or the parameter shapes: a checkpoint may be resumed with others.
IMPLEMENTATION_FIELDS = ("attn_impl", "matmul_impl", "norm_impl", "loss_impl", "scan_layers",
                         "remat")


class CheckpointDamaged(ValueError):
    """A checkpoint whose files are missing, truncated or altered."""


class Restored(NamedTuple):
    state: TrainState
    meta: dict[str, Any]


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir).absolute() / CHECKPOINT_SUBDIR


def open_manager(run_dir: str | os.PathLike, *, keep: int | None = None,
                 create: bool = False) -> ocp.CheckpointManager:
    """The Orbax manager of a run folder; `keep` bounds how many checkpoints stay."""
    directory = checkpoint_dir(run_dir)
    if not create and not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints in {run_dir}: {directory} does not exist")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=create, enable_async_checkpointing=False,
        cleanup_tmp_directories=create)
    return ocp.CheckpointManager(directory, options=options, item_handlers=_item_handlers())


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
    # Named handlers let Orbax read each item's metadata (the saved tree's
    # shapes and dtypes) before anything is restored.
    handlers = {"params": ocp.StandardCheckpointHandler(),
                "train": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    return handlers


def save(manager: ocp.CheckpointManager, state: TrainState, meta: dict[str, Any]) -> None:
    """Save `state` under its step number, with `meta` as JSON."""
    step = int(state.step)
    train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
    manager.save(step, force=True, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        train=ocp.args.StandardSave(train),
        meta=ocp.args.JsonSave(dict(meta, step=step))))
    manager.wait_until_finished()
    if jax.process_index() == 0:
        _write_files_record(Path(os.fspath(manager.directory)) / str(step))


# -- integrity -------------------------------------------------------------------
def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_files_record(step_dir: Path) -> None:
    files = {str(f.relative_to(step_dir)): [f.stat().st_size, _crc32(f)]
             for f in sorted(step_dir.rglob("*")) if f.is_file() and f.name != FILES_RECORD}
    tmp = step_dir / (FILES_RECORD + ".tmp")
    tmp.write_text(json.dumps(files, indent=0))
    os.replace(tmp, step_dir / FILES_RECORD)


def verify(run_dir: str | os.PathLike, step: int) -> None:
    """Raise `CheckpointDamaged` naming the first file of checkpoint `step`
    that is missing, or whose size or checksum differs from what was saved.
    Checkpoints saved without a record are checked when Orbax reads them."""
    step_dir = checkpoint_dir(run_dir) / str(step)
    record = step_dir / FILES_RECORD
    if not record.exists():
        return
    try:
        files = json.loads(record.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointDamaged(f"checkpoint {step_dir} is damaged: {FILES_RECORD} is "
                                f"unreadable ({err})") from None
    for name, (size, crc) in files.items():
        path = step_dir / name
        if not path.is_file():
            problem = "is missing"
        elif path.stat().st_size != size:
            problem = f"has {path.stat().st_size} bytes, {size} were saved"
        elif _crc32(path) != crc:
            problem = "has other contents than were saved (checksum differs)"
        else:
            continue
        raise CheckpointDamaged(f"checkpoint {step_dir} is damaged: {name} {problem}")


def _damage(where: Path, err: Exception) -> CheckpointDamaged:
    """An Orbax or tensorstore read error as one line naming the file."""
    chain, e = [], err
    while e is not None and len(chain) < 8:  # the file is named somewhere down the chain
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    named = [f for f in re.findall(r'local file "([^"]+)"', "\n".join(chain))
             if f.startswith(str(where)) and Path(f).is_file()]
    name = Path(named[-1]).relative_to(where) if named else _bad_json(where)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    first = first.split(". See full TensorStore details")[0]
    detail = f"{name} is unreadable" if name else f"{type(err).__name__}: {first[:200]}"
    return CheckpointDamaged(f"checkpoint {where} is damaged: {detail}")


def _bad_json(where: Path) -> Path | None:
    """The first of a checkpoint's JSON files that does not parse."""
    for f in sorted(where.rglob("*")):
        if f.is_file() and (f.name in ("_CHECKPOINT_METADATA", "metadata", "_METADATA",
                                       "_sharding") or f.parent.name == "array_metadatas"):
            try:
                json.loads(f.read_bytes())
            except (ValueError, OSError):
                return f.relative_to(where)
    return None


def newest_intact(run_dir: str | os.PathLike, *, fallback: bool = True,
                  manager: ocp.CheckpointManager | None = None,
                  report=lambda line: print(line, file=sys.stderr)) -> int | None:
    """The newest saved step whose files are intact (None when there is none
    saved). Each damaged newer one is reported in one line and moved to
    `<run>/damaged/<step>`; with `fallback=False` the first is an error instead.
    A checkpoint saved without a files record (an older jaxllm's) is read in
    full to tell: resuming from one costs a second read."""
    manager = manager or open_manager(run_dir)
    steps = sorted(manager.all_steps(), reverse=True)
    moved = False
    for step in steps:
        try:
            verify(run_dir, step)
            if not (checkpoint_dir(run_dir) / str(step) / FILES_RECORD).exists():
                restore(run_dir, step)  # no sizes and checksums to check: read it whole
        except CheckpointDamaged as err:
            if not fallback:
                raise CheckpointDamaged(f"{err} (without --no-fallback the newest intact "
                                        "checkpoint is used)") from None
            if jax.process_index() == 0:
                aside = Path(run_dir).absolute() / DAMAGED_SUBDIR / str(step)
                aside.parent.mkdir(exist_ok=True)
                if aside.exists():
                    shutil.rmtree(aside)
                shutil.move(checkpoint_dir(run_dir) / str(step), aside)
                report(f"{err}; moved to {aside}")
            moved = True
            continue
        if moved:
            manager.reload()
            report(f"falling back to checkpoint {step}, the newest intact one")
        return step
    if steps:
        raise CheckpointDamaged(f"no intact checkpoint in {checkpoint_dir(run_dir)}: every "
                                f"one is damaged (moved to {Path(run_dir) / DAMAGED_SUBDIR})")
    return None


def _pick_step(manager: ocp.CheckpointManager, run_dir, step: int | None) -> int:
    steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(f"no complete checkpoint in {checkpoint_dir(run_dir)}")
    if step is None:
        return manager.latest_step()
    if step not in steps:
        raise ValueError(f"no checkpoint for step {step} in {checkpoint_dir(run_dir)}; "
                         f"saved steps: {sorted(steps)}")
    return step


def _default_sharding() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _on_default_device(tree):
    sharding = _default_sharding()
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def abstract_state(state_fn: Callable[..., TrainState], *args) -> TrainState:
    """`jax.eval_shape(state_fn, *args)`: the shapes and dtypes of the state
    that `state_fn` builds (your own params, trainable set and optimizer),
    nothing allocated; with shardings added, a target for `restore`."""
    return jax.eval_shape(state_fn, *args)


def abstract_train_state(config: GPTConfig, tc: TrainConfig, *, optimizer=None,
                         trainable: Trainable = None, params=None,
                         state: TrainState | None = None) -> TrainState:
    """The shapes and dtypes of a fresh TrainState (nothing is allocated).

    `state` (arrays or `jax.ShapeDtypeStruct`s) is used as it is: a tree with
    a new head or adapters, another optimizer. Otherwise the state is
    `init_train_state(params, tc, optimizer, trainable=trainable)`, with
    `params` by default a fresh `init_params(config)`.
    """
    if state is not None:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)

    def fresh():
        p = init_params(config, jax.random.key(0), scheme=tc.init) if params is None else params
        return init_train_state(p, tc, optimizer, trainable=trainable)

    return abstract_state(fresh)


def configs_from_meta(meta: dict[str, Any]) -> tuple[GPTConfig, TrainConfig]:
    return GPTConfig.from_dict(meta["model"]), TrainConfig(**meta["train"])


def _read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def read_meta(run_dir: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of a checkpoint (the latest when `step` is None)."""
    manager = open_manager(run_dir)
    step = _pick_step(manager, run_dir, step)
    return _reading(run_dir, step, lambda: _read_meta(manager, step))


def _saved_trees(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """{"params", "train"}: the saved trees with an `ArrayMetadata` (shape,
    dtype) per array; dicts and lists as saved, NamedTuples as dicts of their
    fields, tuples as lists, empty states as None."""
    metadata = manager.item_metadata(step)
    out = {}
    for item in ("params", "train"):
        tree = metadata[item]
        out[item] = getattr(tree, "tree", tree)
    return out


def _shapes_of_metadata(tree, sharding):
    def leaf(m):
        if not (hasattr(m, "shape") and hasattr(m, "dtype")):
            raise TypeError(f"checkpoint leaf {m!r} is not an array")
        return jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=sharding)

    return jax.tree.map(leaf, tree)


def _state_of_items(params, train) -> TrainState:
    return TrainState(step=train["step"], params=params, opt_state=train["opt_state"],
                      rng=train["rng"])


def saved_state_shapes(run_dir: str | os.PathLike, step: int | None = None) -> TrainState:
    """The saved TrainState as `jax.ShapeDtypeStruct`s on the default device,
    read from the checkpoint's own metadata (no arrays are read): add
    shardings (`jaxllm.sharding.train_state_shardings`) for a sharded restore
    of a tree you do not build yourself. Its optimizer state is in plain
    containers (see `restore`)."""
    manager = open_manager(run_dir)
    trees = _saved_trees(manager, _pick_step(manager, run_dir, step))
    sharding = _default_sharding()
    return _state_of_items(_shapes_of_metadata(trees["params"], sharding),
                           _shapes_of_metadata(trees["train"], sharding))


def _shape_table(tree) -> dict[str, tuple[int, ...]]:
    return {path_str(p): tuple(leaf.shape)
            for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _check_target(where: str, item: str, saved, target) -> None:
    """ValueError naming the first path where `target` and the saved tree differ."""
    have, want = _shape_table(saved), _shape_table(target)
    if have == want:
        return
    for path in [*want, *have]:
        if path not in have:
            problem = f"the target has {item}/{path} {want[path]}, the checkpoint does not"
        elif path not in want:
            problem = f"the checkpoint has {item}/{path} {have[path]}, the target does not"
        elif have[path] != want[path]:
            problem = (f"{item}/{path} has shape {have[path]} in the checkpoint, "
                       f"{want[path]} in the target")
        else:
            continue
        missing = len(want.keys() - have.keys())
        extra = len(have.keys() - want.keys())
        reshaped = sum(have[k] != want[k] for k in have.keys() & want.keys())
        raise ValueError(
            f"the restore target does not match the checkpoint {where}: {problem} "
            f"({missing} path(s) only in the target, {extra} only in the checkpoint, "
            f"{reshaped} of other shapes). Pass a target built like the saved state "
            f"(same parameters, trainable set and optimizer), or none to restore the saved tree")


def _as_target(tree):
    """Arrays and ShapeDtypeStructs as ShapeDtypeStructs with a sharding (the
    default device where none is given)."""
    default = _default_sharding()

    def leaf(a):
        sharding = getattr(a, "sharding", None)
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding or default)

    return jax.tree.map(leaf, tree)


def restore(run_dir: str | os.PathLike, step: int | None = None,
            target: TrainState | None = None) -> Restored:
    """The TrainState and metadata of a checkpoint (the latest when `step` is None).

    `target` is a TrainState of arrays or `jax.ShapeDtypeStruct`s, built like
    the saved state (e.g. `abstract_state` of your own init): each array lands
    with the target's sharding (another device mesh, say; the default device
    where it has none), and the optimizer state comes back in the target's
    containers (optax NamedTuples). A target whose paths or shapes differ from
    the saved tree is a ValueError naming the first difference.

    Without a target the saved tree is restored as it is, whatever it holds
    (extra heads, adapters, any optimizer), on the default device: parameters
    as the nested dicts and lists they were, but the optimizer state in plain
    containers (NamedTuples as dicts of their fields, tuples as lists, empty
    states as None). It holds the same leaves in the same order, which is
    enough to compare or inspect; to train on, pass a target.
    """
    manager = open_manager(run_dir)
    step = _pick_step(manager, run_dir, step)
    where = f"{checkpoint_dir(run_dir) / str(step)}"
    verify(run_dir, step)
    meta, saved = _reading(run_dir, step, lambda: (_read_meta(manager, step),
                                                   _saved_trees(manager, step)))
    if target is None:
        sharding = _default_sharding()
        params_target = _shapes_of_metadata(saved["params"], sharding)
        train_target = _shapes_of_metadata(saved["train"], sharding)
    else:
        target = TrainState(*target)
        params_target = _as_target(target.params)
        train_target = _as_target({"step": target.step, "opt_state": target.opt_state,
                                   "rng": target.rng})
        _check_target(where, "params", saved["params"], params_target)
        _check_target(where, "train", saved["train"], train_target)
    out = _reading(run_dir, step, lambda: manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(params_target),
        train=ocp.args.StandardRestore(train_target))))
    return Restored(_state_of_items(out["params"], out["train"]), meta)


def load_params(run_dir: str | os.PathLike, step: int | None = None, *, fallback: bool = True
                ) -> tuple[Any, GPTConfig, str]:
    """(params, GPTConfig, tokenizer name) of a checkpoint, for inference.

    Only the parameters are read, not the optimizer state: the saved tree as
    it is (a classification head, adapters included), on the default device.
    With `step` None the newest checkpoint that reads is used: a damaged newer
    one is reported in one line and skipped (`fallback=False`: an error).
    A given `step` is read or refused, never replaced.
    """
    params, meta = load_params_and_meta(run_dir, step, fallback=fallback)
    return params, GPTConfig.from_dict(meta["model"]), meta["tokenizer"]


def load_params_and_meta(run_dir: str | os.PathLike, step: int | None = None, *,
                         fallback: bool = True,
                         report: Callable[[str], None] = lambda line: print(line,
                                                                             file=sys.stderr)
                         ) -> tuple[Any, dict[str, Any]]:
    """(params, metadata) of the checkpoint `load_params` picks: for runs whose
    metadata says more than the model (a classifier's classes and pooling).
    `report` gets the line that names a damaged checkpoint skipped."""
    manager = open_manager(run_dir)
    try:
        chosen = _pick_step(manager, run_dir, step)
        candidates = [chosen] if step is not None else sorted(manager.all_steps(), reverse=True)
        for i, s in enumerate(candidates):
            try:
                return _load_params_at(manager, run_dir, s)
            except CheckpointDamaged as err:
                if step is not None or not fallback:
                    raise
                later = candidates[i + 1:]
                report(f"{err}; " + (f"falling back to checkpoint {later[0]}" if later else
                                     "no older checkpoint to fall back to"))
    finally:
        manager.close()
    raise CheckpointDamaged(f"no checkpoint in {checkpoint_dir(run_dir)} reads: every one "
                            "is damaged")


def _load_params_at(manager: ocp.CheckpointManager, run_dir, step: int):
    verify(run_dir, step)

    def read():
        meta = _read_meta(manager, step)
        shapes = _shapes_of_metadata(_saved_trees(manager, step)["params"], _default_sharding())
        params = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(shapes)))["params"]
        return params, meta

    return _reading(run_dir, step, read)


def _reading(run_dir, step: int, read: Callable[[], Any]):
    """`read()`, with an Orbax or tensorstore failure turned into one
    `CheckpointDamaged` line naming the checkpoint and, where known, the file."""
    try:
        return read()
    except CheckpointDamaged:
        raise
    except Exception as err:  # tensorstore, JSON and Orbax errors alike
        raise _damage(checkpoint_dir(run_dir) / str(step), err) from None


_MODEL_DEFAULTS = GPTConfig().to_dict()
_TRAIN_ADDED = {"weight_decay_on": TrainConfig().weight_decay_on}  # TrainConfig fields added


def _upgraded(saved: dict[str, Any]) -> dict[str, Any]:
    """Metadata of an older checkpoint in today's terms: `classify.decay_all`
    became `train.weight_decay_on` ("all" when it was true)."""
    classify, train = saved.get("classify"), saved.get("train")
    if not (isinstance(classify, dict) and "decay_all" in classify):
        return saved
    classify = {k: v for k, v in classify.items() if k != "decay_all"}
    if isinstance(train, dict) and "weight_decay_on" not in train:
        train = dict(train, weight_decay_on="all" if saved["classify"]["decay_all"] else "matrices")
    return dict(saved, classify=classify, train=train)


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'section.field: checkpoint X, now Y' for every field that would make
    resuming a different run (implementation-only model fields excepted)."""
    saved = _upgraded(saved)
    diffs = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section), current.get(section)
        if section == "model" and isinstance(a, dict) and isinstance(b, dict):
            # a field added to GPTConfig since the checkpoint was saved has its default there
            a, b = {**_MODEL_DEFAULTS, **a}, {**_MODEL_DEFAULTS, **b}
        if section == "train" and isinstance(a, dict) and isinstance(b, dict):
            a, b = {**_TRAIN_ADDED, **a}, {**_TRAIN_ADDED, **b}  # the same for TrainConfig
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if section == "model" and key in IMPLEMENTATION_FIELDS:
                    continue
                if a.get(key, "<absent>") != b.get(key, "<absent>"):
                    diffs.append(f"{section}.{key}: checkpoint {a.get(key, '<absent>')!r}, "
                                 f"now {b.get(key, '<absent>')!r}")
        elif a != b:
            diffs.append(f"{section}: checkpoint {a!r}, now {b!r}")
    return diffs


def check_compatible(run_dir, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint saved under a different configuration."""
    keys = set(current)
    diffs = config_differences({k: saved.get(k) for k in keys}, current)
    if diffs:
        raise ValueError(f"the checkpoint in {checkpoint_dir(run_dir)} (step {saved.get('step')}) "
                         f"was saved with a different configuration:\n  " + "\n  ".join(diffs)
                         + "\nuse the same settings to resume, or a new --out folder")
