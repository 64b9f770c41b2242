"""Next-token cross-entropy and perplexity."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.config import GPTConfig
from jaxllm.model import Params, apply, check_tokens


def cross_entropy(logits, targets, mask=None):
    """Mean cross-entropy of integer `targets` under `logits` (..., vocab), in float32.

    Computed as logsumexp minus the target logit, so no (..., vocab) array of
    log-probabilities is materialised. `mask` (same shape as targets, 0/1 or
    bool) selects the positions that count; the mean is over those. A target
    outside [0, vocab) makes the loss NaN (unless masked out).
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    # take_along_axis wraps negative indices like NumPy; make every id outside
    # [0, vocab) give NaN, so a bad target under jit cannot pass unnoticed.
    valid = (targets >= 0) & (targets < logits.shape[-1])
    safe = jnp.where(valid, targets, 0)
    target_logit = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, lse - target_logit, jnp.nan)
    if mask is None:
        return nll.mean()
    if mask.shape != targets.shape:
        raise ValueError(f"mask has shape {mask.shape}, targets have shape {targets.shape}")
    mask = mask.astype(jnp.float32)
    # where as well as multiply: an ignored position must not bring a NaN in (0 * NaN).
    nll = jnp.where(mask != 0, nll * mask, 0.0)
    return nll.sum() / jnp.maximum(mask.sum(), 1.0)


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
    targets = check_tokens(targets, config, name="targets")
    if inputs.shape != targets.shape:
        raise ValueError(f"inputs {inputs.shape} and targets {targets.shape} differ in shape")
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.shape != targets.shape:
            raise ValueError(f"mask has shape {mask.shape}, targets have shape {targets.shape}")
    if inputs.ndim == 1:  # one sequence: the same mean over its positions
        inputs, targets = inputs[None], targets[None]
        mask = None if mask is None else mask[None]
    logits = apply(params, inputs, config, rng=rng if train else None)
    return cross_entropy(logits, targets, mask)


def perplexity(loss):
    """exp(mean cross-entropy): the effective number of equally likely next tokens."""
    return jnp.exp(loss)
