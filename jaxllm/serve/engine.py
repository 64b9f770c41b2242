"""The device side of `jaxllm serve`: a key-value cache of fixed slots, and two
jitted functions over it.

`SlotEngine.prefill(slot, ids)` runs one prompt into one slot (a batch of one,
padded to its power-of-two bucket, exactly `jaxllm.generate`'s prefill) and
leaves that slot's next-token logits beside the cache. `SlotEngine.decode(...)`
draws the next token of every occupied slot from those logits (greedy or
sampled, each slot with its own temperature, top-p and seed), feeds it to the
model at that slot's own position and keeps the new logits.

A decode step costs what the occupied slots need, not what `slots` allows: it
runs on the first `rows` slots of the cache only, `rows` the smallest of a few
compiled slot counts (`slot_buckets`: the powers of two below `slots`, and
`slots`) that covers the last occupied slot. The scheduler puts each request in
the lowest free slot, so the occupied slots stay near the front and one client
on a 32-slot server decodes a batch of one. Slots past `rows` are neither read
nor written; the cache is donated and each step writes its new keys and values
into it in place. Both functions reuse generate.py's cached forward pass and
the model's block; the cache's shape never changes, so after one compilation
per prompt bucket, and per slot count and decode variant (greedy, sampling),
nothing recompiles while serving. (Moving requests to keep the occupied slots
a strict prefix would copy their cache rows; a hole left by a finished request
is filled by the next one instead, and until then costs one idle row.)

A request's prompt plus its new tokens must fit the context: the server
refuses longer ones (no sliding window here).
"""

from __future__ import annotations

import collections
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


@partial(jax.jit, donate_argnames=("state",), static_argnames=("config", "sampling", "rows"))
def _decode_step(params: Params, state: SlotState, active, temperature, top_p, seed, step, *,
                 config: GPTConfig, sampling: bool, rows: int):
    """One token for each of the first `rows` slots (the other arguments
    have `rows` entries): drawn from the slot's logits (argmax where its
    temperature is 0; else softmax(logits / temperature) within the top-p
    nucleus, with the key `fold_in(PRNGKey(seed), step)`, as `generate`
    draws a lone prompt's step), then fed to the model at the slot's
    position. Inactive slots among them compute garbage that nobody reads;
    the slots past `rows` are untouched. Returns the new state and the
    tokens (rows,)."""
    TRACE_COUNTS["serve_decode"] += 1
    p = cast_params(params, config)
    logits, length = state.logits[:rows], state.length[:rows]
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if sampling:
        def draw(logits, s, i, t, tp):
            key = jax.random.fold_in(jax.random.PRNGKey(s), i)
            return sample_next(logits[None], key, Sampler(t, jnp.int32(1), tp),
                               filters=(False, True))[0]

        safe_t = jnp.where(temperature > 0, temperature, 1.0)
        drawn = jax.vmap(draw)(logits, seed, step, safe_t, top_p)
        nxt = jnp.where(temperature > 0, drawn, nxt)
    pos = jnp.where(active, jnp.minimum(length, config.context_length - 1), 0)
    hidden, cache = _forward_cached(p, nxt[:, None], pos[:, None], pos, state.cache, config)
    logits = _logits_at(p, hidden, jnp.zeros_like(pos), config)
    length = jnp.where(active, length + 1, length)
    return SlotState(cache, jax.lax.dynamic_update_slice(state.logits, logits, (0, 0)),
                     jax.lax.dynamic_update_slice(state.length, length, (0,))), nxt


def slot_buckets(slots: int) -> tuple[int, ...]:
    """The slot counts a decode step is compiled for: 1, 2, 4, ... below
    `slots`, and `slots`."""
    return tuple(1 << i for i in range((slots - 1).bit_length()) if 1 << i < slots) + (slots,)


class SlotEngine:
    """`slots` sequences decoded together; which slot holds which request is
    the scheduler's business, not this class's. `rows_decoded` counts the
    decode steps run at each slot count."""

    def __init__(self, params: Params, config: GPTConfig, slots: int):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.params, self.config, self.slots = params, config, slots
        self.buckets = slot_buckets(slots)
        self.rows_decoded: collections.Counter = collections.Counter()
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
        """One step of the occupied slots. The arguments have one entry per
        slot, or per slot up to the last occupied one: which are active,
        their temperature, top-p, seed and tokens drawn so far. Returns the
        tokens of the first `rows` slots, `rows` the smallest of `buckets`
        past the last active slot (its own and the idle slots' among them
        mean nothing)."""
        active = np.asarray(active, bool)
        if len(active) > self.slots:
            raise ValueError(f"{len(active)} slots given to an engine of {self.slots}")
        used = int(np.flatnonzero(active)[-1]) + 1 if active.any() else 1
        rows = next(b for b in self.buckets if b >= used)

        def fit(values, dtype):
            out = np.zeros(rows, dtype)
            values = np.asarray(values, dtype)[:rows]
            out[:len(values)] = values
            return jnp.asarray(out)

        temperature = np.asarray(temperature, np.float32)
        self.state, tokens = _decode_step(
            self.params, self.state, fit(active, bool), fit(temperature, np.float32),
            fit(top_p, np.float32), fit(seed, np.uint32), fit(step, np.int32),
            config=self.config, rows=rows,
            sampling=bool((temperature[:len(active)][active] > 0).any()))
        self.rows_decoded[rows] += 1
        return np.asarray(tokens)

    def warm_up(self) -> None:
        """Compile every prompt bucket and both decode variants at every slot
        count now, so the first requests do not wait for XLA."""
        ctx = self.config.context_length
        n = 1
        while True:
            self.prefill(0, [0] * n)
            bucket = prompt_bucket(n, ctx)
            if bucket >= ctx:
                break
            n = bucket + 1
        for rows in self.buckets:
            zeros = np.zeros(rows)
            for t in (0.0, 1.0):
                self.decode(np.ones(rows, bool), zeros + t, zeros + 1.0, zeros, zeros)
        self.rows_decoded.clear()
