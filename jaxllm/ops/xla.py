"""The model's operations as XLA programs: what runs on every backend.

Two carry a hand-written backward pass, because autodiff of the forward
formula leaves XLA's CPU backend extra passes over the activations:
`layer_norm` (two row means for the input gradient, two column sums for the
scale and bias) and `token_nll` (softmax minus one-hot, in one fused pass,
with no (..., vocab) log-probabilities kept). `matmul` copies the weight
gradient's transposed operand on the CPU, where XLA's dot reads a transposed
operand well below its plain rate; the GPU's GEMMs take transposes for free.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


# -- LayerNorm -------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps: float):
    """LayerNorm over the last axis with biased variance, computed in float32,
    returned in x's dtype."""
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    x32 = x.astype(jnp.float32)
    centered = x32 - x32.mean(-1, keepdims=True)
    rstd = jax.lax.rsqrt(jnp.square(centered).mean(-1, keepdims=True) + eps)
    xhat = centered * rstd
    y = xhat * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(x.dtype), (xhat, rstd, scale, bias)


def _layer_norm_bwd(eps, res, g):
    del eps
    xhat, rstd, scale, bias = res
    g32 = g.astype(jnp.float32)
    gs = g32 * scale.astype(jnp.float32)
    # d/dx of (x - mean) * rstd, applied to gs: the standard LayerNorm input gradient
    dx = rstd * (gs - gs.mean(-1, keepdims=True) - xhat * (gs * xhat).mean(-1, keepdims=True))
    rows = (-1, xhat.shape[-1])
    dscale = (g32 * xhat).reshape(rows).sum(0)
    dbias = g32.reshape(rows).sum(0)
    return dx.astype(g.dtype), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


# -- matrix products --------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x, w, transpose_w: bool = False):
    """x @ w (or x @ w.T, with w stored as (out, in)) by XLA's dot, 2-D operands.

    The same product as autodiff's; in the backward the weight gradient's
    transposed operand is first copied to a contiguous array on the CPU,
    where XLA's dot reads it in place at well below its plain rate.
    """
    return _matmul_fwd(x, w, transpose_w)[0]


def _matmul_fwd(x, w, transpose_w):
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"matmul takes 2-D operands, got shapes {x.shape} and {w.shape}")
    y = jnp.einsum("nd,vd->nv", x, w) if transpose_w else x @ w
    return y, (x, w)


def _contiguous_transpose(a):
    def copied(a):
        return jax.lax.optimization_barrier(a.T)  # the barrier keeps the copy out of the dot

    return jax.lax.platform_dependent(a, cpu=copied, default=lambda a: a.T)


def _matmul_bwd(transpose_w, res, g):
    x, w = res
    if transpose_w:  # y = x @ w.T: dx = g @ w, dw = g.T @ x
        dx, dw = g @ w, _contiguous_transpose(g) @ x
    else:
        dx, dw = g @ w.T, _contiguous_transpose(x) @ g
    return dx.astype(x.dtype), dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


def add_bias(y, b):
    return y + b


def dense_gelu(x, w, b):
    """GELU (tanh form) of x @ w + b."""
    return jax.nn.gelu(matmul(x, w) + b, approximate=True)


# -- the token loss ----------------------------------------------------------------
@jax.custom_vjp
def token_nll(logits, targets):
    """-log softmax(logits)[target] per position, float32, shape `targets.shape`;
    NaN where a target is outside [0, vocab)."""
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
    # A target outside the vocabulary has no gradient: NaN, as its loss is, wherever
    # it counts (g != 0), so that a bad target cannot train the model silently.
    logits, lse, targets = res
    x = logits.astype(jnp.float32)
    probs = jnp.exp(x - lse[..., None])
    grad = (probs - _is_target(x, targets).astype(jnp.float32)) * g[..., None]
    bad = ((targets < 0) | (targets >= x.shape[-1])) & (g != 0)
    grad = jnp.where(bad[..., None], jnp.nan, grad)
    return grad.astype(logits.dtype), None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)
