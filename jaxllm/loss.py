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
    bool) selects the positions that count; the mean is over those.
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = lse - target_logit
    if mask is None:
        return nll.mean()
    mask = mask.astype(jnp.float32)
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def lm_loss(params: Params, inputs, targets, config: GPTConfig, *, mask=None,
            train: bool = False, rng=None):
    """Mean next-token cross-entropy of `targets` given `inputs`, both (batch, seq).

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
    logits = apply(params, inputs, config, rng=rng if train else None)
    return cross_entropy(logits, targets, mask)


def perplexity(loss):
    """exp(mean cross-entropy): the effective number of equally likely next tokens."""
    return jnp.exp(loss)
