"""A small, cache-free text sampler for watching a model learn.

Each new token runs the whole model on the last `context_length` tokens.
The tokens sit left-aligned in a buffer whose length is the next power of
two (at least 16, at most `context_length`) and the logits are read at the
last real position; causal attention makes the padding after it irrelevant.
The few buffer lengths mean a few compilations per sample, not one per token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import GPTConfig
from jaxllm.model import apply
from jaxllm.tokenizer import Tokenizer


@functools.partial(jax.jit, static_argnames=("config",))
def _logits_at(params, buffer, position, config: GPTConfig):
    return apply(params, buffer, config)[0, position, : config.vocab_size]


def _bucket(n: int, ctx: int) -> int:
    return min(ctx, max(16, 1 << (n - 1).bit_length()))


def sample_text(params, config: GPTConfig, tokenizer: Tokenizer, prompt: str,
                max_new_tokens: int = 50, *, temperature: float = 0.0, top_k: int | None = None,
                key: jax.Array | None = None) -> str:
    """The prompt followed by `max_new_tokens` sampled tokens, decoded.

    `temperature` 0 is greedy decoding; above 0 it samples from the softmax of
    logits / temperature (restricted to the `top_k` largest when given), which
    needs `key`. An empty prompt starts from the end-of-text token.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if temperature > 0 and key is None:
        raise ValueError("sampling with temperature > 0 needs a PRNG key")
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    n_prompt = len(ids)
    ctx = config.context_length
    for i in range(max_new_tokens):
        window = ids[-ctx:]
        buffer = np.zeros((1, _bucket(len(window), ctx)), np.int32)
        buffer[0, : len(window)] = window
        logits = _logits_at(params, jnp.asarray(buffer), len(window) - 1, config)
        if temperature == 0:
            next_id = int(jnp.argmax(logits))
        else:
            logits = logits / temperature
            if top_k is not None:
                kth = jax.lax.top_k(logits, top_k)[0][-1]
                logits = jnp.where(logits < kth, -jnp.inf, logits)
            next_id = int(jax.random.categorical(jax.random.fold_in(key, i), logits))
        ids.append(next_id)
    return prompt + tokenizer.decode(ids[n_prompt:])
