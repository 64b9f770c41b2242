"""Causal multi-head self-attention kernels.

All take q of shape (batch, seq, heads, head_dim) and k, v of shape (batch,
seq, kv_heads, head_dim), and return q's shape. With fewer key/value heads
than query heads (grouped-query attention) query head i reads key/value head
i // (heads / kv_heads), as in Hugging Face's `repeat_kv`. They compute one
function and are tested equal; they differ in speed:

- `reference`: the textbook einsum, explicit causal mask, softmax in float32.
  It is the only one that applies dropout to the attention weights.
- `blockwise`: causal attention over query blocks, each attending only to the
  keys at or before it, so the masked upper triangle is mostly never computed.
  The fastest XLA path on CPU.
- `xla` / `cudnn`: `jax.nn.dot_product_attention` with that implementation,
  which takes fewer key/value heads natively.
- `mkl`: a native CPU kernel (`jaxllm.kernels.mkl.attention`), float32, that
  reads q, k and v straight from the qkv projection's output; fastest on x86
  CPUs. `packed_causal_attention` takes that packed input, which is how the
  model calls every implementation. It has no grouped-query form: a config
  with fewer key/value heads, or RoPE, refuses it (`GPTConfig` validation).
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
    """Causal attention that never computes the key blocks above the diagonal.

    The heads are moved next to the batch once, giving (batch*heads, seq,
    head_dim) operands, and the queries are cut into blocks of `block_size`
    (the last one may be shorter). Query block i attends to keys
    0..end_i, so summed over blocks the score and value products do about
    half the work of full attention, and only the diagonal block needs a
    mask. Each block is a plain batched matmul, which XLA's CPU backend runs
    at close to its matmul rate, forward and backward. Scores and softmax
    are float32 whatever the input dtype.
    """
    b, t, h, d = q.shape
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    # Scaling q (t*d values) is cheaper than scaling the scores (t*t).
    qh, kh, vh = (_heads_first(x) for x in (q * (1.0 / math.sqrt(d)), k, v))
    outs = []
    for lo in range(0, t, block_size):
        hi = min(lo + block_size, t)
        outs.append(_attend(qh[:, lo:hi], kh[:, :hi], vh[:, :hi], q_offset=lo))
    out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
    return out.reshape(b, h, t, d).transpose(0, 2, 1, 3)


def _heads_first(x):
    """(batch, seq, heads, head_dim) -> (batch*heads, seq, head_dim)."""
    b, t, h, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b * h, t, d)


def _attend(qh, kh, vh, *, q_offset: int):
    """Causal attention of (already scaled) queries at positions q_offset.. over keys 0..

    Operands are (batch*heads, seq, head_dim). The mask select fuses into
    the softmax, so masking the whole block costs no extra pass.
    """
    tq, tk = qh.shape[1], kh.shape[1]
    scores = jnp.matmul(qh, kh.transpose(0, 2, 1), preferred_element_type=jnp.float32)
    causal = (jnp.arange(tq)[:, None] + q_offset) >= jnp.arange(tk)[None, :]
    scores = jnp.where(causal, scores, _MASK_VALUE)
    weights = jax.nn.softmax(scores, axis=-1).astype(vh.dtype)
    return jnp.matmul(weights, vh)


def repeat_kv(x, groups: int):
    """(batch, seq, kv_heads, head_dim) -> (batch, seq, kv_heads * groups, head_dim),
    each key/value head repeated for the `groups` query heads that read it."""
    return jnp.repeat(x, groups, axis=2) if groups > 1 else x


def split_qkv(qkv, n_heads: int):
    """The qkv projection's output (batch, seq, 3 * emb) as q, k, v of shape
    (batch, seq, heads, head_dim)."""
    b, t, width = qkv.shape
    heads = qkv.reshape(b, t, 3, n_heads, width // (3 * n_heads))
    return heads[:, :, 0], heads[:, :, 1], heads[:, :, 2]


def packed_causal_attention(qkv, n_heads: int, impl: str, *, dropout_rate: float = 0.0,
                            rng=None):
    """Attention from the qkv projection's output (batch, seq, 3 * emb) to (batch, seq, emb).

    The last axis holds q, k and v side by side, each `n_heads` heads wide.
    `mkl` consumes it as it is; the others split it into (batch, seq, heads,
    head_dim) operands first.
    """
    if impl == "mkl" and dropout_rate == 0.0:
        from jaxllm.kernels import mkl  # builds the kernel on first use
        return mkl.attention(qkv, n_heads)
    b, t, width = qkv.shape
    out = causal_attention(*split_qkv(qkv, n_heads), impl, dropout_rate=dropout_rate, rng=rng)
    return out.reshape(b, t, width // 3)


def causal_attention(q, k, v, impl: str, *, dropout_rate: float = 0.0, rng=None):
    """Dispatch to the kernel named by `impl` (see the module docstring).

    Dropout on the attention weights needs the weights themselves, so when it
    is active every implementation falls back to `reference`. The XLA and
    cuDNN kernels read shared key/value heads in place; the others are given
    each group's key/value head repeated.
    """
    if impl in ("xla", "cudnn") and dropout_rate == 0.0:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    groups = q.shape[2] // k.shape[2]
    if groups > 1:
        if impl == "mkl":
            raise ValueError("attn_impl='mkl' has no grouped-query attention (fewer key/value "
                             "heads than query heads); use attn_impl='blockwise' or 'xla'")
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    if impl == "reference" or dropout_rate > 0.0:
        return reference_attention(q, k, v, dropout_rate=dropout_rate, rng=rng)
    if impl == "blockwise":
        return blockwise_attention(q, k, v)
    if impl == "mkl":
        b, t, h, d = q.shape
        qkv = jnp.concatenate([x.reshape(b, t, h * d) for x in (q, k, v)], axis=-1)
        return packed_causal_attention(qkv, h, impl).reshape(b, t, h, d)
    raise ValueError(f"unknown attention implementation {impl!r}")
