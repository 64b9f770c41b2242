"""Next-token cross-entropy and perplexity."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.config import LOSS_IMPLS, GPTConfig
from jaxllm.model import Params, apply, check_tokens


def cross_entropy(logits, targets, mask=None, *, impl: str = "xla"):
    """Mean cross-entropy of integer `targets` under `logits` (..., vocab), in float32.

    The per-position loss is logsumexp minus the target logit, with a
    hand-written gradient (softmax minus one-hot, see `token_nll`): no
    (..., vocab) array of log-probabilities is kept for the backward pass
    and no scatter is needed to place the target gradient. `mask` (same
    shape as targets, 0/1 or bool) selects the positions that count; the
    mean is over those. A target outside [0, vocab) makes the loss NaN
    (unless masked out), so a bad target under jit cannot pass unnoticed.
    `impl` is `GPTConfig.loss_impl`: "xla", or "mkl" for the per-position
    loss as one CPU kernel pass forward and one backward
    (`jaxllm.kernels.mkl.token_nll`, float32 logits).
    """
    if impl not in LOSS_IMPLS:
        raise ValueError(f"cross_entropy impl must be one of {LOSS_IMPLS}, got {impl!r}")
    if impl == "mkl":
        from jaxllm.kernels import mkl

        nll = mkl.token_nll(logits.astype(jnp.float32), targets)
    else:
        nll = token_nll(logits, targets)
    if mask is None:
        return nll.mean()
    if mask.shape != targets.shape:
        raise ValueError(f"mask has shape {mask.shape}, targets have shape {targets.shape}")
    mask = mask.astype(jnp.float32)
    # where as well as multiply: an ignored position must not bring a NaN in (0 * NaN).
    nll = jnp.where(mask != 0, nll * mask, 0.0)
    return nll.sum() / jnp.maximum(mask.sum(), 1.0)


@jax.custom_vjp
def token_nll(logits, targets):
    """-log softmax(logits)[target] per position, float32, shape `targets.shape`."""
    return _token_nll_fwd(logits, targets)[0]


def _is_target(logits, targets):
    """Boolean (..., vocab): True at each position's target id (fuses; never stored)."""
    ids = jax.lax.broadcasted_iota(targets.dtype, logits.shape, logits.ndim - 1)
    return ids == targets[..., None]


def _token_nll_fwd(logits, targets):
    x = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(x, axis=-1)
    target_logit = jnp.sum(jnp.where(_is_target(x, targets), x, 0.0), axis=-1)
    valid = (targets >= 0) & (targets < x.shape[-1])
    nll = jnp.where(valid, lse - target_logit, jnp.nan)
    return nll, (logits, lse, targets)


def _token_nll_bwd(res, g):
    # d nll / d logits = softmax(logits) - one_hot(target): one fused elementwise pass.
    logits, lse, targets = res
    x = logits.astype(jnp.float32)
    probs = jnp.exp(x - lse[..., None])
    grad = (probs - _is_target(x, targets).astype(jnp.float32)) * g[..., None]
    return grad.astype(logits.dtype), None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


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
    logits = apply(params, inputs, config, rng=rng if train else None, upcast_logits=False)
    return cross_entropy(logits, targets, mask, impl=config.loss_impl)


def perplexity(loss):
    """exp(mean cross-entropy): the effective number of equally likely next tokens."""
    return jnp.exp(loss)
