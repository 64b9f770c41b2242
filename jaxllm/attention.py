"""Causal multi-head self-attention kernels.

All take q, k, v of shape (batch, seq, heads, head_dim) and return the same
shape. They compute one function and are tested equal; they differ in speed:

- `reference`: the textbook einsum, explicit causal mask, softmax in float32.
  It is the only one that applies dropout to the attention weights.
- `blockwise`: causal attention over query blocks, each attending only to the
  keys at or before it, so the masked upper triangle is mostly never computed.
  Fastest on CPU.
- `xla` / `cudnn`: `jax.nn.dot_product_attention` with that implementation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_MASK_VALUE = -1e30  # finite, so a fully masked row cannot produce NaN


def reference_attention(q, k, v, *, dropout_rate: float = 0.0, rng=None):
    """softmax(q k^T / sqrt(d) + causal mask) v, with optional dropout on the weights."""
    t = q.shape[1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / math.sqrt(q.shape[-1])
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    scores = jnp.where(causal, scores, _MASK_VALUE)
    weights = jax.nn.softmax(scores, axis=-1)
    if dropout_rate > 0.0:
        keep = jax.random.bernoulli(rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)


def blockwise_attention(q, k, v, *, block_size: int = 64):
    """Causal attention that skips the key blocks above the diagonal.

    The sequence is split into `n` blocks of queries. Block i attends to keys
    0..(i+1)*block-1, so summed over blocks it does about half the work of
    full attention. Each block is a plain batched matmul over
    (batch*heads, block, head_dim), which XLA's CPU backend runs well.
    """
    b, t, h, d = q.shape
    if t <= block_size or t % block_size:
        return _bmm_attention(q, k, v, q_offset=0)
    outs = []
    for i in range(t // block_size):
        lo, hi = i * block_size, (i + 1) * block_size
        outs.append(_bmm_attention(q[:, lo:hi], k[:, :hi], v[:, :hi], q_offset=lo))
    return jnp.concatenate(outs, axis=1)


def _bmm_attention(q, k, v, *, q_offset: int):
    """Causal attention of queries at positions q_offset.. over keys 0.., as batched matmuls."""
    b, tq, h, d = q.shape
    tk = k.shape[1]
    # (batch*heads, seq, head_dim) puts one matrix product per head in a single batch.
    qh = q.transpose(0, 2, 1, 3).reshape(b * h, tq, d)
    kh = k.transpose(0, 2, 1, 3).reshape(b * h, tk, d)
    vh = v.transpose(0, 2, 1, 3).reshape(b * h, tk, d)
    scores = jnp.matmul(qh, kh.transpose(0, 2, 1)).astype(jnp.float32) / math.sqrt(d)
    causal = (jnp.arange(tq)[:, None] + q_offset) >= jnp.arange(tk)[None, :]
    scores = jnp.where(causal, scores, _MASK_VALUE)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.matmul(weights, vh)
    return out.reshape(b, h, tq, d).transpose(0, 2, 1, 3)


def causal_attention(q, k, v, impl: str, *, dropout_rate: float = 0.0, rng=None):
    """Dispatch to the kernel named by `impl` (see the module docstring).

    Dropout on the attention weights needs the weights themselves, so when it
    is active every implementation falls back to `reference`.
    """
    if impl == "reference" or dropout_rate > 0.0:
        return reference_attention(q, k, v, dropout_rate=dropout_rate, rng=rng)
    if impl == "blockwise":
        return blockwise_attention(q, k, v)
    if impl in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    raise ValueError(f"unknown attention implementation {impl!r}")
