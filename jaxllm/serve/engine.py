"""The device side of `jaxllm serve`: a key-value cache of fixed slots, and two
jitted functions over it.

`SlotEngine.prefill(slot, ids)` runs one prompt into one slot (a batch of one,
padded to its power-of-two bucket, exactly `jaxllm.generate`'s prefill) and
leaves that slot's next-token logits beside the cache. `SlotEngine.decode(...)`
draws the next token of every slot from those logits (greedy or sampled, each
slot with its own temperature, top-p and seed), feeds it to the model at that
slot's own position and keeps the new logits. Both reuse generate.py's cached
forward pass and the model's block; the cache's shape never changes, so after
one compilation per prompt bucket (and the two decode variants, greedy and
sampling) nothing recompiles while serving.

A request's prompt plus its new tokens must fit the context: the server
refuses longer ones (no sliding window here).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import GPTConfig
from jaxllm.generate import (TRACE_COUNTS, KVCache, Sampler, _forward_cached, _logits_at,
                             _prefill_into, empty_cache, prompt_bucket, sample_next)
from jaxllm.model import Params, cast_params


class SlotState(NamedTuple):
    """The cache of every slot and what each slot's next step needs."""

    cache: KVCache
    logits: jax.Array  # (slots, vocab_size) float32 logits of each slot's next token
    length: jax.Array  # (slots,) int32 tokens cached in each slot


@partial(jax.jit, donate_argnames=("state",), static_argnames=("config",))
def _prefill_slot(params: Params, state: SlotState, tokens, length, slot, *,
                  config: GPTConfig) -> SlotState:
    """The right-padded prompt tokens (1, bucket) of true `length` run into
    `slot`: one compilation per bucket."""
    TRACE_COUNTS["serve_prefill"] += 1
    p = cast_params(params, config)
    one, logits = _prefill_into(p, tokens, length[None], empty_cache(config, 1), config)
    at = (slot, 0, 0, 0)
    cache = KVCache([jax.lax.dynamic_update_slice(big, small, at)
                     for big, small in zip(state.cache.keys, one.keys)],
                    [jax.lax.dynamic_update_slice(big, small, at)
                     for big, small in zip(state.cache.values, one.values)])
    return SlotState(cache,
                     jax.lax.dynamic_update_slice(state.logits, logits, (slot, 0)),
                     state.length.at[slot].set(length))


@partial(jax.jit, donate_argnames=("state",), static_argnames=("config", "sampling"))
def _decode_step(params: Params, state: SlotState, active, temperature, top_p, seed, step, *,
                 config: GPTConfig, sampling: bool):
    """One token for every active slot: drawn from the slot's logits (argmax
    where its temperature is 0; else softmax(logits / temperature) within
    the top-p nucleus, with the key `fold_in(PRNGKey(seed), step)`, as
    `generate` draws a lone prompt's step), then fed to the model at the
    slot's position. Inactive slots compute garbage that nobody reads.
    Returns the new state and the tokens (slots,)."""
    TRACE_COUNTS["serve_decode"] += 1
    p = cast_params(params, config)
    nxt = jnp.argmax(state.logits, axis=-1).astype(jnp.int32)
    if sampling:
        def draw(logits, s, i, t, tp):
            key = jax.random.fold_in(jax.random.PRNGKey(s), i)
            return sample_next(logits[None], key, Sampler(t, jnp.int32(1), tp),
                               filters=(False, True))[0]

        safe_t = jnp.where(temperature > 0, temperature, 1.0)
        drawn = jax.vmap(draw)(state.logits, seed, step, safe_t, top_p)
        nxt = jnp.where(temperature > 0, drawn, nxt)
    pos = jnp.where(active, jnp.minimum(state.length, config.context_length - 1), 0)
    hidden, cache = _forward_cached(p, nxt[:, None], pos[:, None], pos, state.cache, config)
    logits = _logits_at(p, hidden, jnp.zeros_like(pos), config)
    length = jnp.where(active, state.length + 1, state.length)
    return SlotState(cache, logits, length), nxt


class SlotEngine:
    """`slots` sequences decoded together; which slot holds which request is
    the scheduler's business, not this class's."""

    def __init__(self, params: Params, config: GPTConfig, slots: int):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.params, self.config, self.slots = params, config, slots
        self.state = SlotState(empty_cache(config, slots),
                               jnp.zeros((slots, config.vocab_size), jnp.float32),
                               jnp.zeros((slots,), jnp.int32))

    def prefill(self, slot: int, ids) -> None:
        """Run the prompt `ids` (1 <= len <= context_length) into `slot`."""
        n = len(ids)
        if not 1 <= n <= self.config.context_length:
            raise ValueError(f"a prompt of {n} tokens does not fit the context length "
                             f"{self.config.context_length}")
        padded = np.zeros((1, prompt_bucket(n, self.config.context_length)), np.int32)
        padded[0, :n] = ids
        self.state = _prefill_slot(self.params, self.state, jnp.asarray(padded), jnp.int32(n),
                                   jnp.int32(slot), config=self.config)

    def decode(self, active, temperature, top_p, seed, step) -> np.ndarray:
        """One step of every slot (arrays of length `slots`: which are active,
        their temperature, top-p, seed and tokens drawn so far); the tokens."""
        temperature = np.asarray(temperature, np.float32)
        self.state, tokens = _decode_step(
            self.params, self.state, jnp.asarray(active, bool), jnp.asarray(temperature),
            jnp.asarray(top_p, np.float32), jnp.asarray(seed, np.uint32),
            jnp.asarray(step, np.int32), config=self.config,
            sampling=bool((temperature[np.asarray(active, bool)] > 0).any()))
        return np.asarray(tokens)

    def warm_up(self) -> None:
        """Compile every prompt bucket and both decode variants now, so the
        first requests do not wait for XLA."""
        ctx = self.config.context_length
        n = 1
        while True:
            self.prefill(0, [0] * n)
            bucket = prompt_bucket(n, ctx)
            if bucket >= ctx:
                break
            n = bucket + 1
        zeros = np.zeros(self.slots)
        for t in (0.0, 1.0):
            self.decode(np.ones(self.slots, bool), zeros + t, zeros + 1.0, zeros, zeros)
