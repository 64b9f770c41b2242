"""Llama 3 and Qwen3: what they compute that GPT-2 does not.

The parameter tree::

    {"tok_emb":   {"embedding": (vocab, emb)},
     "blocks": [{"norm1": {"scale"},
                 "attn":  {"q": {"kernel": (emb, heads*hd)}, "k": {"kernel": (emb, kv*hd)},
                           "v": {"kernel": (emb, kv*hd)}, "o": {"kernel": (heads*hd, emb)},
                           "q_norm": {"scale": (hd,)}, "k_norm": {"scale": (hd,)}},  # qk_norm
                 "norm2": {"scale"},
                 "ffn":   {"gate": {"kernel": (emb, hidden)}, "up": {"kernel": (emb, hidden)},
                           "down": {"kernel": (hidden, emb)}}}, ...],
     "final_norm": {"scale"},
     "out_head":  {"kernel": (emb, vocab)}}          # tie_embeddings: absent (or a LoRA adapter)

(hd = `head_dim`, kv = `kv_heads`.) No biases anywhere. Dense weights are
(in, out); Hugging Face's `nn.Linear` stores the transpose (`jaxllm.layout`).
Positions enter as RoPE on queries and keys, in Hugging Face's rotate-half
form, with Llama 3's frequency scaling when `rope_scaling="llama3"`; the norm
is RMSNorm; attention has `kv_heads` key/value heads, each shared by
n_heads / kv_heads query heads; Qwen3 RMS-normalises each query and key head
before RoPE (`qk_norm`); the MLP is SwiGLU.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import GPTConfig
from jaxllm.layers import Init, dense, embed_tokens
from jaxllm.ops import ops_for


def init_params(config: GPTConfig, key: jax.Array, *, scheme: str = "gpt2"):
    """A fresh Llama-family tree: weights N(0, 0.02) (the output projections
    and `down` N(0, 0.02/sqrt(2 * n_layers)), as GPT-2 does), or with
    `scheme="torch"` those of `nn.Embedding` / `nn.Linear`; norm scales 1."""
    c = config
    init = Init(c, key, scheme, 2 + 7 * c.n_layers)
    d, f, v = c.emb_dim, c.hidden_dim, c.padded_vocab_size
    q_width, kv_width = c.n_heads * c.head_dim, c.kv_heads * c.head_dim
    resid_std = 0.02 / math.sqrt(2 * c.n_layers)

    def block():
        attn = {"q": init.dense((d, q_width), bias=False),
                "k": init.dense((d, kv_width), bias=False),
                "v": init.dense((d, kv_width), bias=False),
                "o": init.dense((q_width, d), resid_std, bias=False)}
        if c.qk_norm:
            attn["q_norm"] = {"scale": init.ones(c.head_dim)}
            attn["k_norm"] = {"scale": init.ones(c.head_dim)}
        return {"norm1": {"scale": init.ones(d)}, "attn": attn,
                "norm2": {"scale": init.ones(d)},
                "ffn": {"gate": init.dense((d, f), bias=False), "up": init.dense((d, f), bias=False),
                        "down": init.dense((f, d), resid_std, bias=False)}}

    params = {"tok_emb": {"embedding": init.embedding((v, d))},
              "blocks": [block() for _ in range(c.n_layers)],
              "final_norm": {"scale": init.ones(d)}}
    if not c.tie_embeddings:
        params["out_head"] = init.dense((d, v), bias=False)
    return params


def embed(params, tokens, config: GPTConfig, positions=None):
    """The token embeddings alone: positions enter each attention layer as RoPE."""
    del positions
    return embed_tokens(params, tokens, config)


def norm(p, x, config: GPTConfig):
    """RMSNorm: x / sqrt(mean(x^2) + eps) in float32, back in x's dtype, times the
    scale (in that order, as Hugging Face's `LlamaRMSNorm`)."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + config.ln_eps)
    return p["scale"] * y.astype(x.dtype)


# -- RoPE --------------------------------------------------------------------
def rope_frequencies(config: GPTConfig) -> np.ndarray:
    """The (head_dim / 2,) float32 rotation frequencies, as transformers computes
    them (`_compute_default_rope_parameters`, `_compute_llama3_parameters`):
    theta^(-2i/d), and with Llama 3's scaling the long wavelengths divided by
    `rope_factor` and the middle band interpolated."""
    d = config.head_dim
    inv_freq = (1.0 / (np.float32(config.rope_theta)
                       ** (np.arange(0, d, 2).astype(np.float32) / np.float32(d)))).astype(np.float32)
    if config.rope_scaling == "none":
        return inv_freq
    factor = np.float32(config.rope_factor)
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    old = config.rope_original_context
    low_freq_wavelen, high_freq_wavelen = old / low, old / high
    wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq).astype(np.float32)
    smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope(x, positions, config: GPTConfig):
    """x (batch, seq, heads, head_dim) rotated by its positions ((seq,) or
    (batch, seq), absolute): x cos + rotate_half(x) sin, with cos and sin in
    float32 and then in x's dtype, as Hugging Face applies them."""
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(config)
    angles = jnp.concatenate([angles, angles], axis=-1)[..., None, :]  # (.., seq, 1, head_dim)
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos + rotated * sin


# -- attention and MLP ---------------------------------------------------------
def attention(p, x, config: GPTConfig, rng=None, *, attend=None, positions=None):
    """Grouped-query self-attention of x (batch, seq, emb): q, k and v heads
    from their own projections, q/k RMSNorm per head (Qwen3), RoPE at
    `positions` (default 0, 1, ...), causal attention, the output projection.
    `attend(q, k, v) -> (batch, seq, heads, head_dim)` replaces the config's
    attention (the KV-cache decoder's); k and v have `kv_heads` heads."""
    ops = ops_for(config)
    b, t, _ = x.shape
    h, kv, hd = config.n_heads, config.kv_heads, config.head_dim
    q = dense(p["q"], x, ops).reshape(b, t, h, hd)
    k = dense(p["k"], x, ops).reshape(b, t, kv, hd)
    v = dense(p["v"], x, ops).reshape(b, t, kv, hd)
    if config.qk_norm:
        q, k = norm(p["q_norm"], q, config), norm(p["k_norm"], k, config)
    positions = jnp.arange(t) if positions is None else positions
    q, k = rope(q, positions, config), rope(k, positions, config)
    if attend is None:
        rate = config.drop_rate if rng is not None else 0.0
        a = ops.causal_attention(q, k, v, dropout_rate=rate, rng=rng)
    else:
        a = attend(q, k, v)
    return dense(p["o"], a.reshape(b, t, h * hd), ops)


def mlp(p, x, config: GPTConfig):
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    ops = ops_for(config)
    return dense(p["down"], jax.nn.silu(dense(p["gate"], x, ops)) * dense(p["up"], x, ops), ops)
