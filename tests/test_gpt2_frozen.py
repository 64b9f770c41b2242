"""GPT-2's forward and initialisation are bitwise what they were before the
model became a family of architectures.

`_frozen_init` and `_frozen_apply` are the pre-family `jaxllm.model` code
(commit 06dd5ad), kept here unchanged but for names, on top of the same
`jaxllm.ops`; the model of today must give identical bits on fixed weights.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import GPTConfig
from jaxllm.lora import low_rank
from jaxllm.model import apply, init_params
from jaxllm.ops import ops_for


# -- the pre-family model, frozen ------------------------------------------------
def _frozen_init(c: GPTConfig, key, scheme="gpt2"):
    torch_like = scheme == "torch"
    dtype = jnp.dtype(c.param_dtype)
    d, h, v = c.emb_dim, c.hidden_dim, c.padded_vocab_size
    std, resid_std = 0.02, 0.02 / math.sqrt(2 * c.n_layers)
    emb_std = 1.0 if torch_like else std
    keys = iter(jax.random.split(key, 3 + 4 * c.n_layers))

    def normal(shape, s=std):
        return (s * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    def uniform(k, shape, bound):
        return jax.random.uniform(k, shape, jnp.float32, -bound, bound).astype(dtype)

    def norm():
        return {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)}

    def dense(shape, s=std, bias=True):
        if torch_like:
            k, bound = next(keys), 1.0 / math.sqrt(shape[0])
            return {"kernel": uniform(k, shape, bound),
                    **({"bias": uniform(jax.random.fold_in(k, 1), shape[1:], bound)}
                       if bias else {})}
        return {"kernel": normal(shape, s),
                **({"bias": jnp.zeros(shape[1:], dtype)} if bias else {})}

    params = {
        "tok_emb": {"embedding": normal((v, d), emb_std)},
        "pos_emb": {"embedding": normal((c.context_length, d), emb_std)},
        "blocks": [{"norm1": norm(),
                    "attn": {"qkv": dense((d, 3 * d), bias=c.qkv_bias), "out": dense((d, d), resid_std)},
                    "norm2": norm(),
                    "ffn": {"fc": dense((d, h)), "proj": dense((h, d), resid_std)}}
                   for _ in range(c.n_layers)],
        "final_norm": norm(),
    }
    if not c.tie_embeddings:
        params["out_head"] = dense((d, v), bias=False)
    return params


def _dense(p, x, ops, *, gelu=False):
    lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
    if gelu and "bias" in p and "lora" not in p:
        y = ops.dense_gelu(x, p["kernel"], p["bias"])
    else:
        y = ops.matmul(x, p["kernel"])
        y = ops.add_bias(y, p["bias"]) if "bias" in p else y
        y = y + low_rank(p["lora"], x, ops) if "lora" in p else y
        y = jax.nn.gelu(y, approximate=True) if gelu else y
    return y.reshape(*lead, y.shape[-1])


def _dropout(x, rate, rng):
    if rate == 0.0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _frozen_apply(params, tokens, config, *, rng=None):
    ops = ops_for(config)
    dtype = jnp.dtype(config.compute_dtype)
    p = jax.tree.map(lambda a: a.astype(dtype) if a.dtype != dtype else a, params)
    rng = rng if config.drop_rate > 0.0 else None
    r_emb, r_blocks = jax.random.split(rng) if rng is not None else (None, None)
    valid = (tokens >= 0) & (tokens < config.vocab_size)
    ids = jnp.where(valid, tokens, config.padded_vocab_size)
    tok = jnp.take(p["tok_emb"]["embedding"], ids, axis=0, mode="fill", fill_value=jnp.nan)
    x = ops.add_positions(tok, p["pos_emb"]["embedding"][: tokens.shape[-1]]).astype(dtype)
    rate = config.drop_rate if rng is not None else 0.0
    x = _dropout(x, rate, r_emb)

    def ln(q, x):
        return ops.layer_norm(x, q["scale"], q["bias"], config.ln_eps)

    def block(b, x, _config, r):
        r_attn, r1, r2 = jax.random.split(r, 3) if r is not None else (None,) * 3
        qkv = _dense(b["attn"]["qkv"], ln(b["norm1"], x), ops)
        a = ops.attention(qkv, config.n_heads, dropout_rate=rate, rng=r_attn)
        x = x + _dropout(_dense(b["attn"]["out"], a, ops), rate, r1)
        h = _dense(b["ffn"]["proj"], _dense(b["ffn"]["fc"], ln(b["norm2"], x), ops, gelu=True), ops)
        return x + _dropout(h, rate, r2)

    fn = ops.remat(block)
    rngs = None if r_blocks is None else jax.random.split(r_blocks, config.n_layers)
    if config.scan_layers:
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *p["blocks"])
        x = jax.lax.scan(lambda h, layer: (fn(layer[0], h, config, layer[1]), None), x,
                         (stacked, rngs))[0]
    else:
        for i, b in enumerate(p["blocks"]):
            x = fn(b, x, config, None if rngs is None else rngs[i])
    x = ln(p["final_norm"], x)
    if config.tie_embeddings:
        logits = ops.matmul(x.reshape(-1, x.shape[-1]), p["tok_emb"]["embedding"], True)
        logits = logits.reshape(*x.shape[:-1], -1)
    else:
        logits = _dense(p["out_head"], x, ops)
    logits = logits.astype(jnp.float32)
    if config.padded_vocab_size != config.vocab_size:
        fill = max(-1e30, float(jnp.finfo(logits.dtype).min) / 2)
        valid = jnp.arange(config.padded_vocab_size) < config.vocab_size
        logits = logits + jnp.where(valid, 0.0, fill).astype(logits.dtype)
    return logits


# -- the checks ------------------------------------------------------------------
BASE = GPTConfig(vocab_size=97, context_length=32, emb_dim=48, n_heads=4, n_layers=2,
                 drop_rate=0.0)
CASES = {
    "untied": BASE,
    "tied_qkv_bias_padded_scan": BASE.replace(tie_embeddings=True, qkv_bias=True,
                                              vocab_multiple=64, scan_layers=True, remat="full",
                                              attn_impl="reference"),
    "dropout_bfloat16": BASE.replace(drop_rate=0.1, compute_dtype="bfloat16", attn_impl="xla"),
}


def _randomised(params, seed=7):
    """Every leaf random, biases and LayerNorm scales too, so nothing matches by accident."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([(0.5 * jax.random.normal(k, a.shape)).astype(a.dtype) + (a == 1)
                              for k, a in zip(keys, leaves)])


def test_init_params_is_bitwise_the_frozen_init():
    config = BASE.replace(qkv_bias=True)
    for scheme in ("gpt2", "torch"):
        new, old = init_params(config, jax.random.key(3), scheme=scheme), _frozen_init(
            config, jax.random.key(3), scheme)
        assert jax.tree.structure(new) == jax.tree.structure(old)
        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(old)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("config", list(CASES.values()), ids=list(CASES))
def test_gpt2_forward_is_bitwise_the_frozen_forward(config):
    params = _randomised(init_params(config, jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (2, 19), 0, config.vocab_size)
    rng = jax.random.key(5) if config.drop_rate else None
    new = jax.jit(lambda p, t: apply(p, t, config, rng=rng))(params, tokens)
    old = jax.jit(lambda p, t: _frozen_apply(p, t, config, rng=rng))(params, tokens)
    assert np.isfinite(np.asarray(new)).all()
    np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    if config is not BASE:
        return
    # and the gradient, through the same ops
    loss = lambda f: lambda p: jnp.sum(jnp.sin(f(p, tokens, config, rng=rng)[..., :config.vocab_size]))
    g_new, g_old = jax.jit(jax.grad(loss(apply)))(params), jax.jit(jax.grad(loss(_frozen_apply)))(params)
    for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_old)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
