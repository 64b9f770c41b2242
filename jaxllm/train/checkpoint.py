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
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp

from jaxllm.config import GPTConfig
from jaxllm.model import init_params
from jaxllm.train.optim import TrainConfig
from jaxllm.train.step import TrainState, init_train_state

CHECKPOINT_SUBDIR = "checkpoints"
ITEMS = ("params", "train", "meta")
# GPTConfig fields that change how the same function is computed, not what it
# computes or the parameter shapes: a checkpoint may be resumed with others.
IMPLEMENTATION_FIELDS = ("attn_impl", "matmul_impl", "norm_impl", "loss_impl", "scan_layers",
                         "remat")


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
    return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


def save(manager: ocp.CheckpointManager, state: TrainState, meta: dict[str, Any]) -> None:
    """Save `state` under its step number, with `meta` as JSON."""
    step = int(state.step)
    train = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
    manager.save(step, force=True, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        train=ocp.args.StandardSave(train),
        meta=ocp.args.JsonSave(dict(meta, step=step))))
    manager.wait_until_finished()


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


def _on_default_device(tree):
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def abstract_train_state(config: GPTConfig, tc: TrainConfig) -> TrainState:
    """The shapes and dtypes of a fresh TrainState (nothing is allocated)."""
    return jax.eval_shape(
        lambda: init_train_state(init_params(config, jax.random.key(0)), tc))


def configs_from_meta(meta: dict[str, Any]) -> tuple[GPTConfig, TrainConfig]:
    return GPTConfig.from_dict(meta["model"]), TrainConfig(**meta["train"])


def read_meta(run_dir: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The JSON metadata of a checkpoint (the latest when `step` is None)."""
    manager = open_manager(run_dir)
    step = _pick_step(manager, run_dir, step)
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore(run_dir: str | os.PathLike, step: int | None = None,
            target: TrainState | None = None) -> Restored:
    """The TrainState and metadata of a checkpoint (the latest when `step` is None).

    `target` is an optional TrainState of `jax.ShapeDtypeStruct`s whose
    shardings say where each array should land (another device mesh, say);
    without it, the state is rebuilt from the saved configs on the default device.
    """
    manager = open_manager(run_dir)
    step = _pick_step(manager, run_dir, step)
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if target is None:
        target = _on_default_device(abstract_train_state(*configs_from_meta(meta)))
    train_target = {"step": target.step, "opt_state": target.opt_state, "rng": target.rng}
    out = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(target.params),
        train=ocp.args.StandardRestore(train_target)))
    train = out["train"]
    state = TrainState(step=train["step"], params=out["params"], opt_state=train["opt_state"],
                       rng=train["rng"])
    return Restored(state, meta)


def load_params(run_dir: str | os.PathLike, step: int | None = None
                ) -> tuple[Any, GPTConfig, str]:
    """(params, GPTConfig, tokenizer name) of a checkpoint, for inference.

    Only the parameters are read, not the optimizer state.
    """
    manager = open_manager(run_dir)
    step = _pick_step(manager, run_dir, step)
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    config = GPTConfig.from_dict(meta["model"])
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    params = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(_on_default_device(shapes))))["params"]
    return params, config, meta["tokenizer"]


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'section.field: checkpoint X, now Y' for every field that would make
    resuming a different run (implementation-only model fields excepted)."""
    diffs = []
    for section in sorted(set(saved) | set(current)):
        a, b = saved.get(section), current.get(section)
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
