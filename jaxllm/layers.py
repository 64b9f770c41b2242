"""The layers every family is built from: the dense layer and dropout.

`dense` is the one place a matrix product of the model happens, so that a
LoRA adapter attached to a layer's parameters (`jaxllm.lora`) and each
`matmul_impl` apply to every family alike.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxllm.config import GPTConfig
from jaxllm.lora import low_rank
from jaxllm.ops import Ops, ops_for


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


_XLA_OPS = ops_for(GPTConfig())


# -- initialisation ----------------------------------------------------------
INIT_SCHEMES = ("gpt2", "torch")


class Init:
    """Draws a family's fresh weights, one key per draw from `n_keys` split keys.

    `scheme="gpt2"`: weights N(0, std) (0.02; the caller passes a smaller std
    for residual projections), embeddings N(0, 0.02), biases 0.
    `scheme="torch"`: what PyTorch's `nn.Embedding` and `nn.Linear` start
    from: embeddings N(0, 1), weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    Norm scales are 1 in both.
    """

    std = 0.02

    def __init__(self, config: GPTConfig, key: jax.Array, scheme: str, n_keys: int):
        if scheme not in INIT_SCHEMES:
            raise ValueError(f"unknown init scheme {scheme!r}; choose from {INIT_SCHEMES}")
        self.torch_like = scheme == "torch"
        self.dtype = jnp.dtype(config.param_dtype)
        self.keys = iter(jax.random.split(key, n_keys))

    def normal(self, shape, s=None):
        s = self.std if s is None else s
        return (s * jax.random.normal(next(self.keys), shape, jnp.float32)).astype(self.dtype)

    def embedding(self, shape):
        return self.normal(shape, 1.0 if self.torch_like else self.std)  # nn.Embedding: N(0, 1)

    def _uniform(self, k, shape, bound):
        return jax.random.uniform(k, shape, jnp.float32, -bound, bound).astype(self.dtype)

    def dense(self, shape, s=None, bias=True):
        """{"kernel": (in, out), "bias"?: (out,)}."""
        if self.torch_like:  # nn.Linear: weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            k, bound = next(self.keys), 1.0 / math.sqrt(shape[0])
            return {"kernel": self._uniform(k, shape, bound),
                    **({"bias": self._uniform(jax.random.fold_in(k, 1), shape[1:], bound)}
                       if bias else {})}
        return {"kernel": self.normal(shape, s),
                **({"bias": jnp.zeros(shape[1:], self.dtype)} if bias else {})}

    def ones(self, n):
        return jnp.ones((n,), self.dtype)

    def zeros(self, n):
        return jnp.zeros((n,), self.dtype)


def embed_tokens(params, tokens, config: GPTConfig):
    """The token embedding's rows for `tokens`. Out-of-range ids give NaN rather
    than a silently clamped row (the eager API checks them before this point)."""
    # jnp.take wraps negative ids like NumPy and would read a padding row for
    # ids in [vocab_size, padded_vocab_size): send every invalid id past the end.
    valid = (tokens >= 0) & (tokens < config.vocab_size)
    tokens = jnp.where(valid, tokens, config.padded_vocab_size)
    return jnp.take(params["tok_emb"]["embedding"], tokens, axis=0, mode="fill",
                    fill_value=jnp.nan)
