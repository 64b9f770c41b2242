"""GPT-2 as pure functions over a parameter pytree.

The parameter tree is nested dicts and a list of blocks, named after the
architecture (print it, map over it, save it)::

    {"tok_emb":   {"embedding": (vocab, emb)},
     "pos_emb":   {"embedding": (context, emb)},
     "blocks": [{"norm1": {"scale", "bias"},
                 "attn":  {"qkv": {"kernel": (emb, 3*emb), "bias"?}, "out": {"kernel", "bias"}},
                 "norm2": {"scale", "bias"},
                 "ffn":   {"fc": {"kernel": (emb, hidden), "bias"}, "proj": {"kernel", "bias"}}}, ...],
     "final_norm": {"scale", "bias"},
     "out_head":  {"kernel": (emb, vocab)}}          # tie_embeddings: absent (or a LoRA adapter)

Dense weights are (in, out), the layout of Hugging Face's GPT-2 `Conv1D`.
How each operation runs (XLA, MKL, native CPU passes, which attention, remat)
is resolved once from the config by `jaxllm.ops`; this file says what GPT-2
computes, top to bottom: the parameters, the layers, the block, the model.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.checks import check_tokens
from jaxllm.config import GPTConfig
from jaxllm.lora import low_rank
from jaxllm.ops import Ops, ops_for

Params = dict[str, Any]


# -- initialisation ----------------------------------------------------------
INIT_SCHEMES = ("gpt2", "torch")


def init_params(config: GPTConfig, key: jax.Array, *, scheme: str = "gpt2") -> Params:
    """A fresh parameter tree.

    `scheme="gpt2"` (default) is GPT-2's initialisation: weights N(0, 0.02),
    residual projections N(0, 0.02/sqrt(2 * n_layers)), biases 0, LayerNorm
    scales 1. `scheme="torch"` is what a PyTorch model built from `nn.Embedding`
    and `nn.Linear` starts from: embeddings N(0, 1), weights and biases
    U(-1/sqrt(fan_in), 1/sqrt(fan_in)), LayerNorm scales 1 (the classic
    from-scratch GPT uses it, and its published loss curves assume it).
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"unknown init scheme {scheme!r}; choose from {INIT_SCHEMES}")
    c = config
    torch_like = scheme == "torch"
    dtype = jnp.dtype(c.param_dtype)
    d, h, v = c.emb_dim, c.hidden_dim, c.padded_vocab_size
    std, resid_std = 0.02, 0.02 / math.sqrt(2 * c.n_layers)
    emb_std = 1.0 if torch_like else std  # nn.Embedding draws N(0, 1)
    keys = iter(jax.random.split(key, 3 + 4 * c.n_layers))

    def normal(shape, s=std):
        return (s * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    def uniform(k, shape, bound):
        return jax.random.uniform(k, shape, jnp.float32, -bound, bound).astype(dtype)

    def norm():
        return {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)}

    def dense(shape, s=std, bias=True):
        if torch_like:  # nn.Linear: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            k, bound = next(keys), 1.0 / math.sqrt(shape[0])
            return {"kernel": uniform(k, shape, bound),
                    **({"bias": uniform(jax.random.fold_in(k, 1), shape[1:], bound)}
                       if bias else {})}
        return {"kernel": normal(shape, s),
                **({"bias": jnp.zeros(shape[1:], dtype)} if bias else {})}

    params: Params = {
        "tok_emb": {"embedding": normal((v, d), emb_std)},
        "pos_emb": {"embedding": normal((c.context_length, d), emb_std)},
        "blocks": [
            {
                "norm1": norm(),
                "attn": {"qkv": dense((d, 3 * d), bias=c.qkv_bias), "out": dense((d, d), resid_std)},
                "norm2": norm(),
                "ffn": {"fc": dense((d, h)), "proj": dense((h, d), resid_std)},
            }
            for _ in range(c.n_layers)
        ],
        "final_norm": norm(),
    }
    if not c.tie_embeddings:
        params["out_head"] = dense((d, v), bias=False)
    return params


# -- embeddings --------------------------------------------------------------
def embed(params: Params, tokens, config: GPTConfig, positions=None):
    """Token plus position embeddings. Out-of-range ids give NaN rather than a
    silently clamped row (the eager API checks them before this point)."""
    # jnp.take wraps negative ids like NumPy and would read a padding row for
    # ids in [vocab_size, padded_vocab_size): send every invalid id past the end.
    valid = (tokens >= 0) & (tokens < config.vocab_size)
    tokens = jnp.where(valid, tokens, config.padded_vocab_size)
    tok = jnp.take(params["tok_emb"]["embedding"], tokens, axis=0, mode="fill", fill_value=jnp.nan)
    if positions is None:
        # A slice, not a gather: its gradient is a pad rather than a scatter-add.
        pos = params["pos_emb"]["embedding"][: tokens.shape[-1]]
        return ops_for(config).add_positions(tok, pos)
    return tok + params["pos_emb"]["embedding"][positions]



# -- layers ------------------------------------------------------------------
def layer_norm(p, x, config: GPTConfig):
    """LayerNorm with biased variance, computed in float32, returned in x's dtype."""
    return ops_for(config).layer_norm(x, p["scale"], p["bias"], config.ln_eps)


def dense(p, x, ops: Ops | None = None, *, gelu: bool = False):
    """x @ kernel + bias (then GELU, tanh form, with `gelu`), the leading axes
    flattened to one matrix product; a "lora" entry adds its low-rank path
    (`jaxllm.lora`). `ops` default: XLA's."""
    ops, lead, x = ops or _XLA_OPS, x.shape[:-1], x.reshape(-1, x.shape[-1])
    if gelu and "bias" in p and "lora" not in p:
        y = ops.dense_gelu(x, p["kernel"], p["bias"])  # one fused pass where the ops have one
    else:
        y = ops.matmul(x, p["kernel"])
        y = ops.add_bias(y, p["bias"]) if "bias" in p else y
        y = y + low_rank(p["lora"], x, ops) if "lora" in p else y
        y = jax.nn.gelu(y, approximate=True) if gelu else y
    return y.reshape(*lead, y.shape[-1])


def dropout(x, rate: float, rng):
    if rate == 0.0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def attention(p, x, config: GPTConfig, rng=None, *, attend=None):
    """Causal multi-head self-attention of x (batch, seq, emb).

    `attend(qkv) -> (batch, seq, emb)` maps the packed q, k, v projection to
    the heads' output; by default it is the config's attention (with dropout
    on the weights when `rng` is given). The KV-cache decoder passes its own,
    which also reads and writes the cache.
    """
    ops = ops_for(config)
    qkv = dense(p["qkv"], x, ops)
    rate = config.drop_rate if rng is not None else 0.0
    a = attend(qkv) if attend else ops.attention(qkv, config.n_heads, dropout_rate=rate, rng=rng)
    return dense(p["out"], a, ops)


def feed_forward(p, x, config: GPTConfig):
    ops = ops_for(config)
    return dense(p["proj"], dense(p["fc"], x, ops, gelu=True), ops)


def block(p, x, config: GPTConfig, rng=None, *, attend=None):
    """One pre-norm transformer block. `rng` is None when dropout is off;
    `attend` as in `attention`."""
    rate = config.drop_rate if rng is not None else 0.0
    r_attn, r_res1, r_res2 = jax.random.split(rng, 3) if rng is not None else (None,) * 3
    a = attention(p["attn"], layer_norm(p["norm1"], x, config), config, r_attn, attend=attend)
    x = x + dropout(a, rate, r_res1)
    h = feed_forward(p["ffn"], layer_norm(p["norm2"], x, config), config)
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
    LayerNorm: float32, or the compute dtype with `upcast=False` (the loss
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
    with `return_hidden` the hidden states after the final LayerNorm. The
    traceable core of `forward`: no input checks; dropout when `rng` is given."""
    p = cast_params(params, config)
    rng = rng if config.drop_rate > 0.0 else None
    r_emb, r_blocks = jax.random.split(rng) if rng is not None else (None, None)
    x = embed(p, tokens, config).astype(jnp.dtype(config.compute_dtype))
    x = dropout(x, config.drop_rate if rng is not None else 0.0, r_emb)
    x = layer_norm(p["final_norm"], run_blocks(p["blocks"], x, config, r_blocks), config)
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


_XLA_OPS = ops_for(GPTConfig())
