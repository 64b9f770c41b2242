"""Next-token cross-entropy and perplexity."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.checks import IGNORE_INDEX, check_tokens
from jaxllm.config import LOSS_IMPLS, GPTConfig
from jaxllm.model import Params, apply
from jaxllm.ops import token_nll_op, xla


def token_loss_sum(logits, targets, mask=None, *, impl: str = "xla",
                   vocab_size: int | None = None):
    """(sum, count) of the cross-entropy of integer `targets` under `logits` (..., vocab).

    A position counts when its target is not `IGNORE_INDEX` and, where `mask`
    (targets' shape, 0/1 or bool) is given, its mask is non-zero; `sum / count`
    is the masked mean. Returning the two parts lets a train step add them up
    over micro-batches and divide once, so the mean is exact whatever each
    micro-batch counts. A counted target outside [0, vocab_size) makes the sum
    and the gradient NaN, so a bad target under jit cannot train the model
    silently; `vocab_size` (default: the logits' width) excludes the columns of
    a padded vocabulary. `impl` is `GPTConfig.loss_impl` (see `jaxllm.ops`).
    """
    if mask is not None and mask.shape != targets.shape:
        raise ValueError(f"mask has shape {mask.shape}, targets have shape {targets.shape}")
    if vocab_size is not None and vocab_size < logits.shape[-1]:
        # A padding column is no target: send such ids out of range, where the loss is NaN.
        targets = jnp.where(targets >= vocab_size, -1, targets)
    counted = targets != IGNORE_INDEX
    if mask is not None:
        counted = counted & (mask != 0)
    # Ignored positions read target 0: a finite loss that the select below drops.
    nll = token_nll_op(impl)(logits, jnp.where(targets == IGNORE_INDEX, 0, targets))
    weight = counted.astype(jnp.float32)
    if mask is not None and mask.dtype != jnp.bool_:  # 0/1 or fractional weights
        weight = jnp.where(counted, mask.astype(jnp.float32), 0.0)
        nll = nll * weight
    if impl == "rowwise":
        # The kernel's gradient for a counted target outside the vocabulary is finite:
        # a zero term whose gradient is NaN there makes it NaN, as the XLA path's is.
        bad = counted & ((targets < 0) | (targets >= logits.shape[-1]))
        nll = nll + jnp.where(bad, jnp.nan, 0.0) * logits[..., 0].astype(jnp.float32)
    # where, not multiply: an ignored position must not bring a NaN in (0 * NaN).
    return jnp.where(counted, nll, 0.0).sum(), weight.sum()


def cross_entropy(logits, targets, mask=None, *, impl: str = "xla",
                  vocab_size: int | None = None):
    """Mean cross-entropy of integer `targets` under `logits` (..., vocab), in float32.

    The mean is over the positions that count (see `token_loss_sum`): targets
    equal to `IGNORE_INDEX` are skipped, as PyTorch's `F.cross_entropy` does.
    The per-position loss is `token_nll`: no (..., vocab) array of
    log-probabilities is kept for the backward pass. With nothing counted
    the result is 0.
    """
    if impl not in LOSS_IMPLS:
        raise ValueError(f"cross_entropy impl must be one of {LOSS_IMPLS}, got {impl!r}")
    total, count = token_loss_sum(logits, targets, mask, impl=impl, vocab_size=vocab_size)
    return total / jnp.maximum(count, 1.0)


token_nll = xla.token_nll  # -log softmax(logits)[target] per position, float32


def reference_cross_entropy(logits, targets):
    """The textbook mean cross-entropy (log_softmax, then pick the target) that
    `cross_entropy` is tested against."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0].mean()


def lm_loss(params: Params, inputs, targets, config: GPTConfig, *, mask=None,
            train: bool = False, rng=None):
    """Mean next-token cross-entropy of `targets` given `inputs`, both (batch, seq)
    (or both (seq,) for one sequence).

    Equal to `torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())`
    on the same logits (restricted to `mask` where given). Traceable: call it
    inside `jax.grad` / `jax.jit`. Dropout is on when `train=True` (needs `rng`).
    """
    if train and rng is None:
        raise ValueError("lm_loss(train=True) needs an rng key for dropout")
    inputs = check_tokens(inputs, config, name="inputs")
    targets = check_tokens(targets, config, name="targets", allow_ignore=True)
    if inputs.shape != targets.shape:
        raise ValueError(f"inputs {inputs.shape} and targets {targets.shape} differ in shape")
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != targets.shape:
            raise ValueError(f"mask has shape {mask.shape}, targets have shape {targets.shape}")
    if inputs.ndim == 1:  # one sequence: the same mean over its positions
        inputs, targets = inputs[None], targets[None]
        mask = None if mask is None else mask[None]
    logits = apply(params, inputs, config, rng=rng if train else None, upcast_logits=False)
    return cross_entropy(logits, targets, mask, impl=config.loss_impl,
                         vocab_size=config.vocab_size)


def perplexity(loss):
    """exp(mean cross-entropy): the effective number of equally likely next tokens."""
    return jnp.exp(loss)
