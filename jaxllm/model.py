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
     "out_head":  {"kernel": (emb, vocab)}}          # absent when tie_embeddings

Dense kernels are (in, out), the layout of Hugging Face's GPT-2 `Conv1D`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.attention import packed_causal_attention, split_qkv
from jaxllm.config import GPTConfig

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
    keys = iter(jax.random.split(key, 3 + 4 * c.n_layers))

    def normal(shape, s=std):
        return (s * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    def embedding(shape):
        return normal(shape, 1.0 if torch_like else std)

    def norm():
        return {"scale": jnp.ones((d,), dtype), "bias": jnp.zeros((d,), dtype)}

    def dense(shape, s=std, bias=True):
        if not torch_like:
            layer = {"kernel": normal(shape, s)}
            if bias:
                layer["bias"] = jnp.zeros((shape[1],), dtype)
            return layer
        k = next(keys)
        bound = 1.0 / math.sqrt(shape[0])
        layer = {"kernel": jax.random.uniform(k, shape, jnp.float32, -bound, bound).astype(dtype)}
        if bias:
            layer["bias"] = jax.random.uniform(jax.random.fold_in(k, 1), (shape[1],),
                                               jnp.float32, -bound, bound).astype(dtype)
        return layer

    params: Params = {
        "tok_emb": {"embedding": embedding((v, d))},
        "pos_emb": {"embedding": embedding((c.context_length, d))},
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


# -- layers ------------------------------------------------------------------
def layer_norm(p, x, eps: float, impl: str = "xla"):
    """LayerNorm with biased variance, computed in float32, returned in x's dtype.

    The backward pass is written out (`_layer_norm_bwd`): two row means for
    the input gradient and two column sums for the scale and bias, where
    autodiff of the forward formula leaves XLA's CPU backend several more
    passes over the activations. `impl` is `GPTConfig.norm_impl`: "xla", or
    "mkl" for the same function as one CPU kernel each way
    (`jaxllm.kernels.mkl.layer_norm`).
    """
    if impl == "mkl":
        from jaxllm.kernels import mkl  # builds the kernels on first use
        return mkl.layer_norm(x, p["scale"], p["bias"], eps)
    if impl != "xla":
        raise ValueError(f"unknown norm implementation {impl!r}")
    return _layer_norm(x, p["scale"], p["bias"], eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, eps):
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


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def norm(p, x, config: GPTConfig):
    """The model's LayerNorm: `layer_norm` with the config's eps and `norm_impl`."""
    return layer_norm(p, x, config.ln_eps, config.norm_impl)


def dense(p, x, impl: str = "xla", *, gelu: bool = False):
    """x @ kernel + bias (then GELU, tanh form, with `gelu`), the leading axes
    flattened to one matrix product.

    `impl` is `GPTConfig.matmul_impl`: "xla" (XLA's dot) or "mkl" (the same
    product and its gradients by Intel MKL, the bias gradient and GELU by
    kernels of the same library: `jaxllm.kernels.mkl`).
    """
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    if impl == "mkl" and "bias" in p:
        from jaxllm.kernels import mkl  # builds the kernels on first use
        y = (mkl.dense_gelu(x, p["kernel"], p["bias"]) if gelu
             else mkl.add_bias(matmul(x, p["kernel"], impl), p["bias"]))
    else:
        y = matmul(x, p["kernel"], impl)
        if "bias" in p:
            y = y + p["bias"]
        if gelu:
            y = jax.nn.gelu(y, approximate=True)
    return y.reshape(*lead, y.shape[-1])


def matmul(x, w, impl: str, *, transpose_w: bool = False):
    """x @ w (or x @ w.T) for 2-D operands, by the `matmul_impl` named."""
    if impl == "mkl":
        from jaxllm.kernels import mkl  # builds the kernel on first use
        return mkl.matmul(x, w, transpose_w)
    if impl != "xla":
        raise ValueError(f"unknown matmul implementation {impl!r}")
    return xla_matmul(x, w, transpose_w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def xla_matmul(x, w, transpose_w: bool = False):
    """x @ w (or x @ w.T, with w stored as (out, in)) by XLA's dot.

    The same product as autodiff's, with one change in the backward: on the
    CPU the weight gradient's transposed operand is copied to a contiguous
    array first. XLA's CPU dot (YNNPACK) runs x.T @ dy with x read in place
    at 0.4-0.95x the rate of the plain product on the model's shapes; copying
    x.T costs a few percent of the product (NOTES.md, v8). Elsewhere the operand is
    read in place, as the GPU's GEMMs take transposes at no cost.
    """
    return _xla_matmul_fwd(x, w, transpose_w)[0]


def _xla_matmul_fwd(x, w, transpose_w):
    if x.ndim != 2 or w.ndim != 2:
        raise ValueError(f"xla_matmul takes 2-D operands, got shapes {x.shape} and {w.shape}")
    y = jnp.einsum("nd,vd->nv", x, w) if transpose_w else x @ w
    return y, (x, w)


def _contiguous_transpose(a):
    def copied(a):
        return jax.lax.optimization_barrier(a.T)  # the barrier keeps the copy out of the dot

    return jax.lax.platform_dependent(a, cpu=copied, default=lambda a: a.T)


def _xla_matmul_bwd(transpose_w, res, g):
    x, w = res
    if transpose_w:  # y = x @ w.T: dx = g @ w, dw = g.T @ x
        dx, dw = g @ w, _contiguous_transpose(g) @ x
    else:
        dx, dw = g @ w.T, _contiguous_transpose(x) @ g
    return dx.astype(x.dtype), dw.astype(w.dtype)


xla_matmul.defvjp(_xla_matmul_fwd, _xla_matmul_bwd)


def dropout(x, rate: float, rng):
    if rate == 0.0 or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def qkv_heads(p, x, config: GPTConfig):
    """Project x (batch, seq, emb) to q, k, v of shape (batch, seq, heads, head_dim)."""
    return split_qkv(dense(p["qkv"], x, config.matmul_impl), config.n_heads)


def feed_forward(p, x, impl: str = "xla"):
    return dense(p["proj"], dense(p["fc"], x, impl, gelu=True), impl)


def block(p, x, config: GPTConfig, rng=None):
    """One pre-norm transformer block. `rng` is None when dropout is off."""
    rate = config.drop_rate if rng is not None else 0.0
    r_attn, r_res1, r_res2 = jax.random.split(rng, 3) if rng is not None else (None,) * 3
    qkv = dense(p["attn"]["qkv"], norm(p["norm1"], x, config), config.matmul_impl)
    a = packed_causal_attention(qkv, config.n_heads, config.attn_impl, dropout_rate=rate,
                                rng=r_attn)
    x = x + dropout(dense(p["attn"]["out"], a, config.matmul_impl), rate, r_res1)
    h = feed_forward(p["ffn"], norm(p["norm2"], x, config), config.matmul_impl)
    return x + dropout(h, rate, r_res2)


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _run_blocks(blocks, x, config: GPTConfig, rng):
    fn = block
    if config.remat != "none":
        fn = jax.checkpoint(block, policy=_REMAT_POLICIES[config.remat], static_argnums=(2,))
    rngs = None if rng is None else jax.random.split(rng, config.n_layers)
    if config.scan_layers:
        stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)

        def step(h, layer):
            p, r = layer
            return fn(p, h, config, r), None

        x, _ = jax.lax.scan(step, x, (stacked, rngs))
        return x
    for i, p in enumerate(blocks):
        x = fn(p, x, config, None if rngs is None else rngs[i])
    return x


def cast_params(params: Params, config: GPTConfig) -> Params:
    """Params in the compute dtype (a no-op when it equals the parameter dtype)."""
    dtype = jnp.dtype(config.compute_dtype)
    return jax.tree.map(lambda a: a.astype(dtype) if a.dtype != dtype else a, params)


def embed(params: Params, tokens, config: GPTConfig, positions=None):
    """Token plus position embeddings. Out-of-range ids give NaN rather than a
    silently clamped row (the eager API checks them before this point)."""
    t = tokens.shape[-1]
    # jnp.take wraps negative ids like NumPy and would read a padding row for
    # ids in [vocab_size, padded_vocab_size): send every invalid id past the end.
    valid = (tokens >= 0) & (tokens < config.vocab_size)
    tokens = jnp.where(valid, tokens, config.padded_vocab_size)
    tok = jnp.take(params["tok_emb"]["embedding"], tokens, axis=0, mode="fill", fill_value=jnp.nan)
    if positions is None:
        # A slice, not a gather: its gradient is a pad rather than a scatter-add.
        pos = params["pos_emb"]["embedding"][:t]
        if config.matmul_impl == "mkl" and tok.ndim > 2:
            from jaxllm.kernels import mkl

            # The table is a bias on every sequence: its gradient, the sum over the
            # batch, one column-sum kernel call (XLA's reduction takes ~0.8 ms here).
            flat = mkl.add_bias(tok.reshape(-1, pos.size), pos.reshape(-1))
            return flat.reshape(tok.shape)
        return tok + pos
    return tok + params["pos_emb"]["embedding"][positions]


def head_logits(params: Params, x, config: GPTConfig, *, upcast: bool = True):
    """Final LayerNorm and output head: logits over the padded vocabulary, in float32
    unless `upcast=False`.

    Columns past `vocab_size` (padding) are set to a large negative value, so they
    take no probability in a softmax, a loss or a sample. With `upcast=False`
    the logits stay in the compute dtype: the loss upcasts them to float32 inside
    its own passes, so no float32 copy of the (batch, seq, vocab) array is stored
    for the backward pass (the values are the same: the head's product rounds to
    the compute dtype either way).
    """
    x = norm(params["final_norm"], x, config)
    if config.tie_embeddings:
        # contract with the embedding as stored, (vocab, emb): multiplying by its
        # transpose makes XLA copy the whole matrix first
        lead = x.shape[:-1]
        logits = matmul(x.reshape(-1, x.shape[-1]), params["tok_emb"]["embedding"],
                        config.matmul_impl, transpose_w=True).reshape(*lead, -1)
    else:
        logits = dense(params["out_head"], x, config.matmul_impl)
    if upcast:
        logits = logits.astype(jnp.float32)
    if config.padded_vocab_size != config.vocab_size:
        # Added rather than selected: an addition's gradient needs nothing saved, where a
        # select would keep a (batch, seq, vocab) mask for the backward. Finite in every
        # compute dtype, with room below it (float16 ends at -65504).
        fill = max(-1e30, float(jnp.finfo(logits.dtype).min) / 2)
        valid = jnp.arange(config.padded_vocab_size) < config.vocab_size
        logits = logits + jnp.where(valid, 0.0, fill).astype(logits.dtype)
    return logits


def apply(params: Params, tokens, config: GPTConfig, *, rng=None, return_hidden: bool = False,
          upcast_logits: bool = True):
    """The model on (batch, seq) token ids; logits over the padded vocabulary.

    The traceable core of `forward`: no input checks, dropout on exactly when
    `rng` is given and `drop_rate` > 0. The logits are float32, or in the
    compute dtype with `upcast_logits=False` (for the loss: `head_logits`).
    """
    p = cast_params(params, config)
    if config.drop_rate == 0.0:
        rng = None
    r_emb, r_blocks = jax.random.split(rng) if rng is not None else (None, None)
    x = embed(p, tokens, config).astype(jnp.dtype(config.compute_dtype))
    x = dropout(x, config.drop_rate if rng is not None else 0.0, r_emb)
    x = _run_blocks(p["blocks"], x, config, r_blocks)
    if return_hidden:
        return x
    return head_logits(p, x, config, upcast=upcast_logits)


def forward(params: Params, tokens, config: GPTConfig, *, train: bool = False, rng=None):
    """Logits of shape (batch, seq, vocab_size) for integer `tokens` (batch, seq).

    A 1-D `tokens` is one sequence and gives (seq, vocab_size). With
    `train=True`, dropout is applied with `rng` (required); with `train=False`
    the result is deterministic. Token ids and length are checked here when
    they are concrete values; under `jax.jit` an out-of-range id yields NaN
    logits instead of silently reading a clamped embedding row.
    """
    tokens = check_tokens(tokens, config)
    if train and rng is None:
        raise ValueError("forward(train=True) needs an rng key for dropout")
    one_seq = tokens.ndim == 1
    if one_seq:
        tokens = tokens[None]
    logits = apply(params, tokens, config, rng=rng if train else None)
    if config.padded_vocab_size != config.vocab_size:
        logits = logits[..., : config.vocab_size]
    return logits[0] if one_seq else logits


def check_tokens(tokens, config: GPTConfig, *, name: str = "tokens", max_len: int | None = None):
    """Validate a token array at the API boundary and return it as a JAX array.

    Checks dtype (integer), rank (1 or 2), length (<= context_length, or
    `max_len`) and, when the values are concrete, the range [0, vocab_size).
    """
    if not hasattr(tokens, "dtype"):  # a list, tuple or Python scalar
        tokens = np.asarray(tokens)
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer token ids, got dtype {tokens.dtype}")
    if tokens.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape (seq,) or (batch, seq), got {tokens.shape}")
    limit = config.context_length if max_len is None else max_len
    if tokens.shape[-1] > limit:
        raise ValueError(
            f"{name} has length {tokens.shape[-1]}, longer than the context length {limit}")
    if tokens.size == 0:
        raise ValueError(f"{name} is empty (shape {tokens.shape})")
    if not isinstance(tokens, jax.core.Tracer):
        arr = np.asarray(tokens)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{name} contains id {bad}, outside [0, {config.vocab_size}) (vocab_size)")
    return jnp.asarray(tokens)
