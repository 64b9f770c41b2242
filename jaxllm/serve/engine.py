"""The device side of `jaxllm serve`: a key-value cache of fixed slots, and two
jitted functions over it.

`SlotEngine.prefill(slots, prompts)` runs a few prompts into their slots (one
right-padded batch, `jaxllm.generate`'s prefill) and leaves each slot's
next-token logits beside the cache. `SlotEngine.decode(...)` draws the next
token of every occupied slot from those logits (greedy or sampled, each slot
with its own temperature, top-p and seed), feeds it to the model at that
slot's own position and keeps the new logits.

A decode step costs what the occupied slots need, not what `slots` allows: it
runs on the first `rows` slots only, `rows` the smallest of a few compiled slot
counts (`slot_buckets`: 2, 4, 8, ... below `slots`, and `slots`) that covers
the last occupied slot. The scheduler puts each request in the lowest free
slot, so the occupied slots stay near the front and one client on a 32-slot
server decodes a batch of two, one of them idle. The cache is stored in groups
of slots that add up to those counts (2, 2, 4, 8, ... slots), and a step attends over
and writes into its first groups as they are stored: the later groups are not
touched, nothing is copied (a slice of one large cache would be, at every
step), and the donated cache is updated in place. Both functions reuse
generate.py's cached forward pass and the model's block; the cache's shapes
never change, so after one compilation per prompt batch shape and per slot
count and decode variant (greedy, sampling), nothing recompiles while serving
(`warm_up` compiles them all). (Moving requests to keep the occupied slots a
strict prefix would copy their cache rows; a hole left by a finished request
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

    cache: list  # KVCaches of consecutive groups of slots, sized by `slot_buckets`' steps
    logits: jax.Array  # (slots, vocab_size) float32 logits of each slot's next token
    length: jax.Array  # (slots,) int32 tokens cached in each slot


@partial(jax.jit, donate_argnames=("state",), static_argnames=("config",))
def _prefill_slots(params: Params, state: SlotState, tokens, length, slot, valid, *,
                   config: GPTConfig) -> SlotState:
    """The right-padded prompts `tokens` (k, bucket) of true `length` (k,) run
    together into the slots `slot` (k,): one compilation per (k, bucket).
    Rows where `valid` is False only pad k to a power of two and are
    dropped."""
    TRACE_COUNTS["serve_prefill"] += 1
    p = cast_params(params, config)
    new, logits = _prefill_into(p, tokens, length, empty_cache(config, tokens.shape[0]), config)

    def put(big, rows, first):
        """Scatter `rows` into `big` (holding slots first..), dropping the
        rows whose slot it does not hold: in place on the donated cache."""
        local = slot - first
        keep = valid & (local >= 0) & (local < big.shape[0])
        return big.at[jnp.where(keep, local, big.shape[0])].set(rows.astype(big.dtype),
                                                                mode="drop")

    cache, first = [], 0
    for group in state.cache:
        cache.append(KVCache([put(big, rows, first) for big, rows in zip(group.keys, new.keys)],
                             [put(big, rows, first)
                              for big, rows in zip(group.values, new.values)]))
        first += group.keys[0].shape[0]
    return SlotState(cache, put(state.logits, logits, 0), put(state.length, length, 0))


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
    """The slot counts a decode step is compiled for: 2, 4, 8, ... below
    `slots`, and `slots`. Not 1: XLA copies a one-row group's cache at
    every step (seen in the compiled program; GPT-2 124M, context 1024: 126
    ms a step on one row against 80 on two), which costs more than an idle
    second row."""
    return tuple(1 << i for i in range(1, (slots - 1).bit_length()) if 1 << i < slots) + (slots,)


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
        sizes = np.diff((0,) + self.buckets)
        self.state = SlotState([empty_cache(config, int(n)) for n in sizes],
                               jnp.zeros((slots, config.vocab_size), jnp.float32),
                               jnp.zeros((slots,), jnp.int32))

    def prefill(self, slots, prompts) -> None:
        """Run the prompts (each 1 <= len <= context_length) into `slots`
        (distinct), as one batch: `prefill_fits` says how many fit one."""
        ctx = self.config.context_length
        for ids in prompts:
            if not 1 <= len(ids) <= ctx:
                raise ValueError(f"a prompt of {len(ids)} tokens does not fit the context "
                                 f"length {ctx}")
        k = len(prompts)
        rows = 1 << (k - 1).bit_length()
        padded = np.zeros((rows, max(prompt_bucket(len(ids), ctx) for ids in prompts)), np.int32)
        length, where = np.ones(rows, np.int32), np.zeros(rows, np.int32)
        for i, (slot, ids) in enumerate(zip(slots, prompts)):
            padded[i, :len(ids)], length[i], where[i] = ids, len(ids), slot
        self.state = _prefill_slots(self.params, self.state, jnp.asarray(padded),
                                    jnp.asarray(length), jnp.asarray(where),
                                    jnp.asarray(np.arange(rows) < k), config=self.config)

    def prefill_fits(self, lengths) -> bool:
        """Whether prompts of these lengths run as one prefill: a lone prompt
        always does; several do while their padded batch (rows rounded up to
        a power of two, each to the longest one's bucket) holds at most
        `context_length` tokens, the work of one context-long prompt. So a
        step's prefill holds the running requests back no longer than one
        prompt's could."""
        if len(lengths) <= 1:
            return True
        ctx = self.config.context_length
        rows = 1 << (len(lengths) - 1).bit_length()
        return rows * max(prompt_bucket(n, ctx) for n in lengths) <= ctx

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
        """Compile every prompt batch the scheduler can ask for (`prefill_fits`)
        and both decode variants at every slot count now, so the first
        requests do not wait for XLA."""
        ctx = self.config.context_length
        buckets = sorted({prompt_bucket(1 << i, ctx) for i in range(ctx.bit_length() + 1)})
        k = 1
        while k <= self.slots:
            for bucket in buckets:
                if self.prefill_fits([bucket] * k):
                    self.prefill(list(range(k)), [[0] * bucket] * k)
            if k == self.slots:
                break
            k = min(2 * k, self.slots)
        for rows in self.buckets:
            zeros = np.zeros(rows)
            for t in (0.0, 1.0):
                self.decode(np.ones(rows, bool), zeros + t, zeros + 1.0, zeros, zeros)
        self.rows_decoded.clear()
