"""The operations the model is written in, resolved once from its config.

`ops_for(config)` returns an `Ops`: dense layers, LayerNorm, causal attention
(from the packed qkv projection, or from q, k and v heads), the position-embedding add and the per-token
loss, each the implementation that the config's `*_impl` fields name. They
compute one function and are tested equal; they differ in speed:

- XLA (`jaxllm.ops.xla`): every backend; the defaults.
- `matmul_impl="mkl"`: the dense products and their gradients by Intel MKL
  (x86-64 CPUs, float32), with the bias gradient and GELU fused by the
  row-wise kernels.
- `norm_impl="rowwise"`, `loss_impl="rowwise"`: LayerNorm, the position
  embedding's gradient and the cross-entropy as single passes of the
  row-wise CPU kernels (`jaxllm/kernels/rowwise.cc`, float32).
- `attn_impl`: see `jaxllm.attention`.
- `remat`: which activations the backward pass recomputes.

model.py sees only the `Ops`: what GPT-2 computes lives there, how each piece
runs lives here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax

from jaxllm.attention import causal_attention, packed_causal_attention
from jaxllm.config import GPTConfig
from jaxllm.ops import xla


@dataclasses.dataclass(frozen=True)
class Ops:
    """The implementations one config resolves to."""

    matmul: Callable  # (x, w, transpose_w=False) -> x @ w, 2-D operands
    add_bias: Callable  # (y, b) -> y + b over the last axis
    dense_gelu: Callable  # (x, w, b) -> gelu(x @ w + b), 2-D x
    layer_norm: Callable  # (x, scale, bias, eps) -> y
    attention: Callable  # (qkv, n_heads, *, dropout_rate, rng) -> (batch, seq, emb)
    causal_attention: Callable  # (q, k, v, *, dropout_rate, rng) -> (batch, seq, heads, head_dim)
    token_nll: Callable  # (logits, targets) -> per-position loss, float32
    add_positions: Callable  # (tok (batch, seq, emb), pos (seq, emb)) -> tok + pos
    remat: Callable  # block -> block, rematerialised in the backward per `GPTConfig.remat`


_REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _remat(policy: str) -> Callable:
    if policy == "none":
        return lambda fn: fn
    return lambda fn: jax.checkpoint(fn, policy=_REMAT_POLICIES[policy], static_argnums=(2,))


def _native():
    from jaxllm.kernels import mkl  # builds the kernels on first use

    return mkl


def _native_add_positions(tok, pos):
    # The table is a bias on every sequence: its gradient, the sum over the
    # batch, is one column-sum kernel call instead of XLA's library reduction.
    if tok.ndim < 3:
        return tok + pos
    flat = _native().add_bias(tok.reshape(-1, pos.size), pos.reshape(-1))
    return flat.reshape(tok.shape)


def _rowwise_token_nll(logits, targets):
    return _native().token_nll(logits.astype("float32"), targets)


def token_nll_op(impl: str) -> Callable:
    """The per-position cross-entropy for `GPTConfig.loss_impl`."""
    if impl == "rowwise":
        return _rowwise_token_nll
    if impl != "xla":
        raise ValueError(f"unknown loss implementation {impl!r}")
    return xla.token_nll


@functools.lru_cache(maxsize=64)
def ops_for(config: GPTConfig) -> Ops:
    """The `Ops` that `config`'s implementation fields name."""
    mkl = config.matmul_impl == "mkl"
    rowwise = config.norm_impl == "rowwise"

    def attention(qkv, n_heads, *, dropout_rate=0.0, rng=None):
        return packed_causal_attention(qkv, n_heads, config.attn_impl,
                                       dropout_rate=dropout_rate, rng=rng)

    def split_attention(q, k, v, *, dropout_rate=0.0, rng=None):
        return causal_attention(q, k, v, config.attn_impl, dropout_rate=dropout_rate, rng=rng)

    return Ops(
        matmul=(lambda x, w, transpose_w=False: _native().matmul(x, w, transpose_w)) if mkl
        else xla.matmul,
        add_bias=(lambda y, b: _native().add_bias(y, b)) if mkl else xla.add_bias,
        dense_gelu=(lambda x, w, b: _native().dense_gelu(x, w, b)) if mkl else xla.dense_gelu,
        layer_norm=(lambda x, s, b, eps: _native().layer_norm(x, s, b, eps)) if rowwise
        else xla.layer_norm,
        attention=attention,
        causal_attention=split_attention,
        token_nll=token_nll_op(config.loss_impl),
        add_positions=_native_add_positions if rowwise else (lambda tok, pos: tok + pos),
        remat=_remat(config.remat),
    )
