"""The model, one set of pure functions for every family.

What each family computes differently lives in its module of `jaxllm.models`:
GPT-2 in `models/gpt2.py`, Llama 3 and Qwen3 in `models/llama.py` (their
parameter trees are drawn there). Each is short and reads top to bottom
without the other's branches: its `init_params`, `embed` (token embeddings,
plus GPT-2's learned positions), `norm` (LayerNorm or RMSNorm), `attention`
(GPT-2's packed qkv; Llama's q/k/v/o with grouped-query heads, RoPE and
Qwen3's q/k norm) and `mlp` (GELU or SwiGLU). This file holds what they
share: the pre-norm block and its residual stream, the layer loop
(`run_blocks`: scan, remat), the LM head, `apply` and `forward`; every dense
layer goes through `jaxllm.layers.dense`, where LoRA adapters attach.

Of the three anchors (penzai's `llamalike_common.py`, one builder with knobs;
levanter, one file per family; the book's `qwen3.py`, one file top to
bottom), this follows levanter's split for what differs and penzai's single
builder for what does not: the families share the block, the loss, the train
step, LoRA, sharding and the KV cache as one piece of code, so a fix there
reaches every family, while a reader still finds all of what GPT-2 (or
Llama) computes in one short file. Which family runs is `GPTConfig.family`.

How each operation runs (XLA, MKL, native CPU passes, which attention,
remat) is resolved once from the config by `jaxllm.ops`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.checks import check_tokens
from jaxllm.config import GPTConfig
from jaxllm.layers import INIT_SCHEMES, dense, dropout  # noqa: F401  (part of this API)
from jaxllm.lora import low_rank
from jaxllm.models import family, gpt2
from jaxllm.ops import ops_for

Params = dict[str, Any]


def init_params(config: GPTConfig, key: jax.Array, *, scheme: str = "gpt2") -> Params:
    """A fresh parameter tree of the config's family (`jaxllm.models`).

    `scheme="gpt2"` (default) is GPT-2's initialisation: weights N(0, 0.02),
    residual projections N(0, 0.02/sqrt(2 * n_layers)), biases 0, norm
    scales 1. `scheme="torch"` is what a PyTorch model built from `nn.Embedding`
    and `nn.Linear` starts from: embeddings N(0, 1), weights and biases
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), norm scales 1 (the classic
    from-scratch GPT uses it, and its published loss curves assume it).
    """
    return family(config).init_params(config, key, scheme=scheme)


def embed(params: Params, tokens, config: GPTConfig, positions=None):
    """The embedded tokens entering the first block (GPT-2 adds its learned
    positions, at `positions` (batch, seq) when given)."""
    return family(config).embed(params, tokens, config, positions)


def norm(p, x, config: GPTConfig):
    """The family's norm (LayerNorm or RMSNorm), float32 inside, x's dtype out."""
    return family(config).norm(p, x, config)


layer_norm = gpt2.norm  # GPT-2's LayerNorm by its own name


def block(p, x, config: GPTConfig, rng=None, *, attend=None, positions=None):
    """One pre-norm transformer block: x + attention(norm(x)), then
    x + mlp(norm(x)). `rng` is None when dropout is off. `attend(q, k, v)`
    replaces the attention kernel (the KV-cache decoder's) and `positions`
    ((seq,) or (batch, seq), default 0, 1, ...) are the tokens' absolute
    positions where the family's attention needs them (RoPE)."""
    fam = family(config)
    rate = config.drop_rate if rng is not None else 0.0
    r_attn, r_res1, r_res2 = jax.random.split(rng, 3) if rng is not None else (None,) * 3
    a = fam.attention(p["attn"], fam.norm(p["norm1"], x, config), config, r_attn, attend=attend,
                      positions=positions)
    x = x + dropout(a, rate, r_res1)
    h = fam.mlp(p["ffn"], fam.norm(p["norm2"], x, config), config)
    return x + dropout(h, rate, r_res2)


# -- the model ---------------------------------------------------------------
def cast_params(params: Params, config: GPTConfig) -> Params:
    """Params in the compute dtype (a no-op when it equals the parameter dtype)."""
    dtype = jnp.dtype(config.compute_dtype)
    return jax.tree.map(lambda a: a.astype(dtype) if a.dtype != dtype else a, params)


def run_blocks(blocks, x, config: GPTConfig, rng=None):
    """The transformer blocks in order: a Python loop, or one `lax.scan` over the
    stacked blocks with `scan_layers`; each rematerialised per `remat`."""
    fn = ops_for(config).remat(block)
    rngs = None if rng is None else jax.random.split(rng, config.n_layers)
    if config.scan_layers:
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)

        def step(h, layer):
            p, r = layer
            return fn(p, h, config, r), None

        return jax.lax.scan(step, x, (stacked, rngs))[0]
    for i, p in enumerate(blocks):
        x = fn(p, x, config, None if rngs is None else rngs[i])
    return x


def lm_head(params: Params, hidden, config: GPTConfig, *, upcast: bool = True):
    """Logits over the padded vocabulary from the hidden states after the final
    norm: float32, or the compute dtype with `upcast=False` (the loss
    upcasts in its own passes). Padding columns get a large negative value, so
    they take no probability. A task that predicts something else replaces
    this function and keeps the rest of the model."""
    ops = ops_for(config)
    if config.tie_embeddings:
        # contract with the embedding as stored, (vocab, emb): its transpose makes XLA copy
        # the whole matrix first. A LoRA adapter on the tied head sits in "out_head".
        lead, x = hidden.shape[:-1], hidden.reshape(-1, hidden.shape[-1])
        logits = ops.matmul(x, params["tok_emb"]["embedding"], True)
        if "out_head" in params:
            logits = logits + low_rank(params["out_head"]["lora"], x, ops)
        logits = logits.reshape(*lead, -1)
    else:
        logits = dense(params["out_head"], hidden, ops)
    if upcast:
        logits = logits.astype(jnp.float32)
    if config.padded_vocab_size != config.vocab_size:
        # Added rather than selected: an addition's gradient needs nothing saved, where a
        # select would keep a (batch, seq, vocab) mask. Finite in every compute dtype.
        fill = max(-1e30, float(jnp.finfo(logits.dtype).min) / 2)
        valid = jnp.arange(config.padded_vocab_size) < config.vocab_size
        logits = logits + jnp.where(valid, 0.0, fill).astype(logits.dtype)
    return logits


def apply(params: Params, tokens, config: GPTConfig, *, rng=None, return_hidden: bool = False,
          upcast_logits: bool = True):
    """The model on (batch, seq) token ids: logits over the padded vocabulary, or
    with `return_hidden` the hidden states after the final norm. The
    traceable core of `forward`: no input checks; dropout when `rng` is given."""
    p = cast_params(params, config)
    rng = rng if config.drop_rate > 0.0 else None
    r_emb, r_blocks = jax.random.split(rng) if rng is not None else (None, None)
    x = embed(p, tokens, config).astype(jnp.dtype(config.compute_dtype))
    x = dropout(x, config.drop_rate if rng is not None else 0.0, r_emb)
    x = norm(p["final_norm"], run_blocks(p["blocks"], x, config, r_blocks), config)
    if return_hidden:
        return x
    return lm_head(p, x, config, upcast=upcast_logits)


def forward(params: Params, tokens, config: GPTConfig, *, train: bool = False, rng=None):
    """Logits (batch, seq, vocab_size) for integer `tokens` (batch, seq), or (seq,
    vocab_size) for one sequence. Dropout with `train=True` (needs `rng`). Ids
    and length are checked when concrete; under `jax.jit` an out-of-range id
    gives NaN logits instead of silently reading a clamped embedding row."""
    tokens = check_tokens(tokens, config)
    if train and rng is None:
        raise ValueError("forward(train=True) needs an rng key for dropout")
    one_seq = tokens.ndim == 1
    logits = apply(params, tokens[None] if one_seq else tokens, config,
                   rng=rng if train else None)[..., : config.vocab_size]  # no padding columns
    return logits[0] if one_seq else logits

