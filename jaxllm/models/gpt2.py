"""GPT-2: what it computes that the other families do not.

The parameter tree::

    {"tok_emb":   {"embedding": (vocab, emb)},
     "pos_emb":   {"embedding": (context, emb)},
     "blocks": [{"norm1": {"scale", "bias"},
                 "attn":  {"qkv": {"kernel": (emb, 3*emb), "bias"?}, "out": {"kernel", "bias"}},
                 "norm2": {"scale", "bias"},
                 "ffn":   {"fc": {"kernel": (emb, hidden), "bias"}, "proj": {"kernel", "bias"}}}, ...],
     "final_norm": {"scale", "bias"},
     "out_head":  {"kernel": (emb, vocab)}}          # tie_embeddings: absent (or a LoRA adapter)

Dense weights are (in, out), the layout of Hugging Face's GPT-2 `Conv1D`.
Positions are a learned table added to the token embeddings; the norm is
LayerNorm with bias; attention projects q, k and v in one packed matrix;
the MLP is GELU (tanh form) between two biased layers.
"""

from __future__ import annotations

import math

import jax

from jaxllm.attention import split_qkv
from jaxllm.config import GPTConfig
from jaxllm.layers import Init, dense, embed_tokens
from jaxllm.ops import ops_for


def init_params(config: GPTConfig, key: jax.Array, *, scheme: str = "gpt2"):
    """A fresh GPT-2 tree. `scheme="gpt2"` is GPT-2's initialisation (weights
    N(0, 0.02), residual projections N(0, 0.02/sqrt(2 * n_layers)), LayerNorm
    scales 1, biases 0); `scheme="torch"` that of `nn.Embedding` / `nn.Linear`
    (the classic from-scratch GPT's; see `jaxllm.layers.Init`)."""
    c = config
    init = Init(c, key, scheme, 3 + 4 * c.n_layers)
    d, h, v = c.emb_dim, c.hidden_dim, c.padded_vocab_size
    resid_std = 0.02 / math.sqrt(2 * c.n_layers)

    def norm():
        return {"scale": init.ones(d), "bias": init.zeros(d)}

    params = {
        "tok_emb": {"embedding": init.embedding((v, d))},
        "pos_emb": {"embedding": init.embedding((c.context_length, d))},
        "blocks": [
            {
                "norm1": norm(),
                "attn": {"qkv": init.dense((d, 3 * d), bias=c.qkv_bias),
                         "out": init.dense((d, d), resid_std)},
                "norm2": norm(),
                "ffn": {"fc": init.dense((d, h)), "proj": init.dense((h, d), resid_std)},
            }
            for _ in range(c.n_layers)
        ],
        "final_norm": norm(),
    }
    if not c.tie_embeddings:
        params["out_head"] = init.dense((d, v), bias=False)
    return params


def embed(params, tokens, config: GPTConfig, positions=None):
    """Token plus position embeddings; `positions` (batch, seq) default 0, 1, ..."""
    tok = embed_tokens(params, tokens, config)
    if positions is None:
        # A slice, not a gather: its gradient is a pad rather than a scatter-add.
        pos = params["pos_emb"]["embedding"][: tokens.shape[-1]]
        return ops_for(config).add_positions(tok, pos)
    return tok + params["pos_emb"]["embedding"][positions]


def norm(p, x, config: GPTConfig):
    """LayerNorm with biased variance, computed in float32, returned in x's dtype."""
    return ops_for(config).layer_norm(x, p["scale"], p["bias"], config.ln_eps)


def attention(p, x, config: GPTConfig, rng=None, *, attend=None, positions=None):
    """Causal multi-head self-attention of x (batch, seq, emb) through the packed
    qkv projection. `attend(q, k, v) -> (batch, seq, heads, head_dim)` replaces
    the config's attention (the KV-cache decoder's); by default dropout applies
    to the weights when `rng` is given. The positions are in the embeddings."""
    del positions
    ops = ops_for(config)
    qkv = dense(p["qkv"], x, ops)
    if attend is None:
        rate = config.drop_rate if rng is not None else 0.0
        a = ops.attention(qkv, config.n_heads, dropout_rate=rate, rng=rng)
    else:
        a = attend(*split_qkv(qkv, config.n_heads)).reshape(*x.shape[:-1], config.emb_dim)
    return dense(p["out"], a, ops)


def mlp(p, x, config: GPTConfig):
    """proj(gelu(fc(x)))."""
    ops = ops_for(config)
    return dense(p["proj"], dense(p["fc"], x, ops, gelu=True), ops)
