"""Tasks and trainable parameters: what a train step minimises, and over which leaves.

A *task* is a function `(params, batch, config, rng) -> (loss_sum, count, aux)`:
`batch` is a dict of arrays with the batch on their leading axis, `loss_sum`
the summed loss over what counts in it, `count` how much counted (tokens,
sequences, mask weight), `aux` a dict of further sums (correct predictions,
say). The step adds numerators and counts over micro-batches and divides
once, so a masked mean is exact whatever each micro-batch holds. Pretraining
is `lm_task`; fine-tuning tasks replace the head or the loss.

*Trainable* parameters are chosen by a regex over parameter paths (keys
joined by "/": ``blocks/11/attn/qkv/kernel``), a predicate `(path, leaf) ->
bool`, a pytree of bools, or None for all. Frozen leaves get no gradient, no
accumulator and no optimizer state: the step differentiates only the
trainable subtree (`partition`), and the optimizer is initialised on that
subtree, with the frozen leaves as empty (None) holes.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Union

import jax
import jax.numpy as jnp

from jaxllm.config import GPTConfig
from jaxllm.loss import token_loss_sum
from jaxllm.model import apply
from jaxllm.tree import path_str  # noqa: F401  (re-exported: callers import it from here)

Batch = dict[str, Any]
Task = Callable[[Any, Batch, GPTConfig, Any], tuple[Any, Any, dict]]
Trainable = Union[None, str, Callable[[str, Any], bool], Any]


def lm_task(params, batch: Batch, config: GPTConfig, rng=None):
    """Next-token cross-entropy: `batch` has "tokens" and "targets" (batch, seq) and
    an optional "mask"; targets equal to -100 are ignored (see `token_loss_sum`)."""
    logits = apply(params, batch["tokens"], config, rng=rng, upcast_logits=False)
    loss_sum, count = token_loss_sum(logits, batch["targets"], batch.get("mask"),
                                     impl=config.loss_impl, vocab_size=config.vocab_size)
    return loss_sum, count, {}


def call_task(task: Task, params, batch: Batch, config: GPTConfig, rng=None):
    """`task(params, batch, config, rng)` with its contract checked, so that a
    mistake in a new task is named where it is made: (loss_sum, count, aux),
    two scalars and a dict (None counts as {}), reading only keys the batch has."""
    try:
        out = task(params, batch, config, rng)
    except KeyError as err:
        key = err.args[0] if err.args else None
        top = sorted(params) if isinstance(params, dict) else []
        if not (isinstance(batch, dict) and isinstance(key, str)) or key in batch or key in top:
            raise
        raise ValueError(f"the task looked up {key!r}, which neither the batch (keys "
                         f"{sorted(batch)}) nor the parameters' top level (keys {top}) "
                         "holds") from None
    if not (isinstance(out, (tuple, list)) and len(out) == 3):
        raise TypeError(f"a task returns (loss_sum, count, aux), got {type(out).__name__}"
                        + (f" of {len(out)}" if isinstance(out, (tuple, list)) else ""))
    loss_sum, count, aux = out
    aux = {} if aux is None else aux
    if not isinstance(aux, dict):
        raise TypeError(f"a task's aux is a dict of sums, got {type(aux).__name__}")
    shapes = {"loss_sum": jnp.shape(loss_sum), "count": jnp.shape(count)}
    if any(shapes.values()):
        raise ValueError(f"a task's loss_sum and count are scalars (sums over the batch), got "
                         f"shapes {shapes}")
    return loss_sum, count, aux


def lm_batch(tokens, targets, mask=None) -> Batch:
    """The batch dict `lm_task` reads."""
    batch = {"tokens": tokens, "targets": targets}
    if mask is not None:
        batch["mask"] = mask
    return batch


# A LoRA adapter's scale (alpha / rank) is a setting carried in the tree, not a weight:
# no trainable choice trains it, or alpha would drift (`jaxllm.lora`).
_CONSTANT = re.compile(r"(.+/)?lora/scale")


def trainable_mask(params, trainable: Trainable = None):
    """A pytree of bools shaped like `params`: True for the leaves to train
    (never a LoRA scale)."""
    mask = jax.tree_util.tree_map_with_path(
        lambda path, m: m and not _CONSTANT.fullmatch(path_str(path)),
        _chosen(params, trainable))
    if trainable is not None and not any(jax.tree.leaves(mask)):
        raise ValueError(f"trainable {trainable!r} selects only LoRA scales, which never train: "
                         "a step would train nothing")
    return mask


def _chosen(params, trainable: Trainable):
    if trainable is None:
        return jax.tree.map(lambda _: True, params)
    if isinstance(trainable, str):
        try:
            regex = re.compile(trainable)
        except re.error as e:
            raise ValueError(f"trainable regex {trainable!r} does not compile: {e}") from None
        mask = jax.tree_util.tree_map_with_path(
            lambda path, _: bool(regex.fullmatch(path_str(path))), params)
        if not any(jax.tree.leaves(mask)):
            raise ValueError(f"trainable regex {trainable!r} matches no parameter; paths look "
                             f"like {path_str(jax.tree_util.tree_leaves_with_path(params)[0][0])!r}")
        return mask
    if callable(trainable):
        mask = jax.tree_util.tree_map_with_path(
            lambda path, leaf: bool(trainable(path_str(path), leaf)), params)
        what = "predicate"
    else:
        if jax.tree.structure(trainable) != jax.tree.structure(params):
            raise ValueError("a trainable mask must be a pytree of bools shaped like the "
                             "parameters")
        mask, what = jax.tree.map(bool, trainable), "mask"
    if not any(jax.tree.leaves(mask)):
        raise ValueError(f"the trainable {what} selects no parameter: a step would train "
                         "nothing")
    return mask


def partition(params, mask):
    """(trainable, frozen): two trees shaped like `params`, each with None where
    the other holds the leaf."""
    trainable = jax.tree.map(lambda m, p: p if m else None, mask, params)
    frozen = jax.tree.map(lambda m, p: None if m else p, mask, params)
    return trainable, frozen


def combine(trainable, frozen):
    """The inverse of `partition`."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                        is_leaf=lambda x: x is None)


def count_trainable(params, trainable: Trainable = None) -> int:
    """Number of trainable parameters."""
    mask = trainable_mask(params, trainable)
    return sum(int(p.size) for m, p in zip(jax.tree.leaves(mask), jax.tree.leaves(params)) if m)
