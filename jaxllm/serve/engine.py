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
step), and the donated cache is updated in place. (Moving requests to keep
the occupied slots a strict prefix would copy their cache rows; a hole left by
a finished request is filled by the next one instead, and until then costs
one idle row.)

A step also reads every slot's whole cache, so the cache's length follows the
requests: the shortest of `cache_lengths` (64 positions, four times as many
at each step, up to the context) that holds the longest running request. A
request that outgrows it makes every slot's cache grow (one copy), and the
cache shrinks back once the long ones have ended. On GPT-2 (context 1,024) a
short chat reads 64 positions a slot, not 1,024.

Both functions reuse generate.py's cached forward pass and the model's block.
After one compilation per prompt batch shape, and one per slot count and
cache length, nothing recompiles while serving (`warm_up` compiles them all).

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

MIN_CACHE_LENGTH = 64  # positions: a short prompt and answer


class SlotState(NamedTuple):
    """The cache of every slot and what each slot's next step needs."""

    cache: list  # KVCaches of consecutive groups of slots, sized by `slot_buckets`' steps
    logits: jax.Array  # (slots, vocab_size) float32 logits of each slot's next token
    length: jax.Array  # (slots,) int32 tokens cached in each slot


@partial(jax.jit, static_argnames=("config",))
def _prefill_rows(params: Params, tokens, length, *, config: GPTConfig):
    """Each row's cache (a KVCache of one row of `bucket` positions) and
    next-token logits (1, vocab_size) for the right-padded prompts `tokens`
    (k, bucket) of true `length` (k,): one compilation per (k, bucket),
    whatever the slots' cache length. One row at a time, the insertion
    compiles once per (bucket, cache length) rather than per (k, bucket,
    cache length)."""
    TRACE_COUNTS["serve_prefill"] += 1
    p = cast_params(params, config)
    new, logits = _prefill_into(p, tokens, length, empty_cache(config, *tokens.shape), config)
    return [(KVCache([k[i:i + 1] for k in new.keys], [v[i:i + 1] for v in new.values]),
             logits[i:i + 1]) for i in range(tokens.shape[0])]


@partial(jax.jit, donate_argnames=("state",))
def _insert(state: SlotState, new: KVCache, logits, length, slot) -> SlotState:
    """Put one prefilled row into the slot `slot` (1,), in place on the
    donated state. A prompt's bucket longer than the slots' cache keeps its
    first positions (the engine made the cache hold the prompt)."""
    TRACE_COUNTS["serve_insert"] += 1

    def put(big, rows, first, axis=None):
        """Scatter `rows` into `big` (holding slots first..) at positions
        0.. along `axis`, dropping the rows whose slot it does not hold."""
        if axis is not None:
            n = min(rows.shape[axis], big.shape[axis])
            rows = jax.lax.slice_in_dim(rows, 0, n, axis=axis)
        local = slot - first
        where = jnp.where((local >= 0) & (local < big.shape[0]), local, big.shape[0])
        index = (where,) + (slice(None),) * (rows.ndim - 1)
        if axis is not None:
            index = index[:axis] + (slice(0, n),) + index[axis + 1:]
        return big.at[index].set(rows.astype(big.dtype), mode="drop")

    cache, first = [], 0
    for group in state.cache:
        cache.append(KVCache([put(big, rows, first, 3) for big, rows in zip(group.keys, new.keys)],
                             [put(big, rows, first, 2)
                              for big, rows in zip(group.values, new.values)]))
        first += group.keys[0].shape[0]
    return SlotState(cache, put(state.logits, logits, 0), put(state.length, length, 0))


@partial(jax.jit, static_argnames=("positions",))
def _resize(state: SlotState, *, positions: int) -> SlotState:
    """The state with every slot's cache cut or zero-padded to `positions`:
    the cached tokens of the running requests fit either way."""
    TRACE_COUNTS["serve_resize"] += 1

    def fit(x, axis):
        if positions <= x.shape[axis]:
            return jax.lax.slice_in_dim(x, 0, positions, axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, positions - x.shape[axis])
        return jnp.pad(x, pad)

    return state._replace(cache=[KVCache([fit(k, 3) for k in g.keys], [fit(v, 2) for v in g.values])
                                 for g in state.cache])


@partial(jax.jit, donate_argnames=("state",), static_argnames=("config", "rows"))
def _decode_step(params: Params, state: SlotState, active, temperature, top_p, seed, step, *,
                 config: GPTConfig, rows: int):
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
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def sample(logits):
        def draw(logits, s, i, t, tp):
            key = jax.random.fold_in(jax.random.PRNGKey(s), i)
            return sample_next(logits[None], key, Sampler(t, jnp.int32(1), tp),
                               filters=(False, True))[0]

        safe_t = jnp.where(temperature > 0, temperature, 1.0)
        drawn = jax.vmap(draw)(logits, seed, step, safe_t, top_p)
        return jnp.where(temperature > 0, drawn, greedy)

    # the nucleus' sort runs only in steps where some slot samples; one
    # compiled step serves both (half the compilations of two variants)
    nxt = jax.lax.cond((active & (temperature > 0)).any(), sample, lambda _: greedy, logits)
    pos = jnp.where(active, jnp.minimum(length, config.context_length - 1), 0)
    hidden, cache = _forward_cached(p, nxt[:, None], pos[:, None], pos, state.cache, config)
    logits = _logits_at(p, hidden, jnp.zeros_like(pos), config)
    length = jnp.where(active, length + 1, length)
    return SlotState(cache, jax.lax.dynamic_update_slice(state.logits, logits, (0, 0)),
                     jax.lax.dynamic_update_slice(state.length, length, (0,))), nxt


def cache_lengths(context_length: int) -> tuple[int, ...]:
    """The lengths the slots' cache takes: 64, then four times as many at each
    step below the context, and the context. A decode step reads every
    slot's whole cache, so a short request on a long model reads 64
    positions, not the context's; the factor of four keeps the compiled
    variants few (three for GPT-2's 1,024) while reading at most four
    times what the longest running request needs."""
    lengths, n = [], MIN_CACHE_LENGTH
    while n < context_length:
        lengths.append(n)
        n *= 4
    return tuple(lengths) + (context_length,)


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
    decode steps run at each slot count, `lengths_decoded` at each cache
    length."""

    def __init__(self, params: Params, config: GPTConfig, slots: int):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.params, self.config, self.slots = params, config, slots
        self.buckets = slot_buckets(slots)
        self.cache_lengths = cache_lengths(config.context_length)
        self.rows_decoded: collections.Counter = collections.Counter()
        self.lengths_decoded: collections.Counter = collections.Counter()
        self.cached = np.zeros(slots, np.int64)  # tokens in each slot's cache, as on the device
        self.cache_length = self.cache_lengths[0]
        sizes = np.diff((0,) + self.buckets)
        self.state = SlotState([empty_cache(config, int(n), self.cache_length) for n in sizes],
                               jnp.zeros((slots, config.vocab_size), jnp.float32),
                               jnp.zeros((slots,), jnp.int32))

    def _hold(self, tokens: int, shrink: bool) -> None:
        """Resize every slot's cache to the shortest of `cache_lengths` that
        holds `tokens` positions (a copy of the cache; only to grow, unless
        `shrink`)."""
        length = next(n for n in self.cache_lengths if n >= min(tokens, self.config.context_length))
        if length < self.cache_length and not shrink:
            return
        while length != self.cache_length:  # one length at a time: the resizes warm_up compiled
            i = self.cache_lengths.index(self.cache_length) + (1 if length > self.cache_length
                                                               else -1)
            self.state = _resize(self.state, positions=self.cache_lengths[i])
            self.cache_length = self.cache_lengths[i]

    def prefill(self, slots, prompts) -> None:
        """Run the prompts (each 1 <= len <= context_length) into `slots`
        (distinct), as one batch: `prefill_fits` says how many fit one."""
        ctx = self.config.context_length
        for ids in prompts:
            if not 1 <= len(ids) <= ctx:
                raise ValueError(f"a prompt of {len(ids)} tokens does not fit the context "
                                 f"length {ctx}")
        self._hold(max(len(ids) for ids in prompts), shrink=False)
        k = len(prompts)
        rows = 1 << (k - 1).bit_length()
        padded = np.zeros((rows, max(prompt_bucket(len(ids), ctx) for ids in prompts)), np.int32)
        length, where = np.ones(rows, np.int32), np.zeros(rows, np.int32)
        for i, (slot, ids) in enumerate(zip(slots, prompts)):
            padded[i, :len(ids)], length[i], where[i] = ids, len(ids), slot
            self.cached[slot] = len(ids)
        out = _prefill_rows(self.params, jnp.asarray(padded), jnp.asarray(length),
                            config=self.config)
        for i in range(k):
            self.state = _insert(self.state, *out[i], jnp.asarray(length[i:i + 1]),
                                 jnp.asarray(where[i:i + 1]))

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
        mean nothing). The cache first takes the shortest of `cache_lengths`
        that holds every active slot's tokens and the new one."""
        active = np.asarray(active, bool)
        if len(active) > self.slots:
            raise ValueError(f"{len(active)} slots given to an engine of {self.slots}")
        used = int(np.flatnonzero(active)[-1]) + 1 if active.any() else 1
        rows = next(b for b in self.buckets if b >= used)
        self._hold(int(self.cached[:len(active)][active].max(initial=0)) + 1, shrink=True)
        on = np.zeros(rows, bool)
        on[:min(rows, len(active))] = active[:rows]
        self.cached[:rows] = np.where(on, np.minimum(self.cached[:rows] + 1,
                                                     self.config.context_length),
                                      self.cached[:rows])
        return self._decode(rows, on, temperature, top_p, seed, step)

    def _decode(self, rows, active, temperature, top_p, seed, step) -> np.ndarray:
        """One step of the first `rows` slots on the cache as it is."""

        def fit(values, dtype):
            out = np.zeros(rows, dtype)
            values = np.asarray(values, dtype)[:rows]
            out[:len(values)] = values
            return out

        self.state, tokens = _decode_step(
            self.params, self.state, jnp.asarray(active),
            *(jnp.asarray(fit(v, t)) for v, t in ((temperature, np.float32), (top_p, np.float32),
                                                   (seed, np.uint32), (step, np.int32))),
            config=self.config, rows=rows)
        self.rows_decoded[rows] += 1
        self.lengths_decoded[self.cache_length] += 1
        return np.asarray(tokens)

    def warm_up(self) -> None:
        """Compile every prompt batch the scheduler can ask for (`prefill_fits`)
        and the decode step at every slot count and cache length now, so the
        first requests do not wait for XLA."""
        ctx = self.config.context_length
        buckets = sorted({prompt_bucket(1 << i, ctx) for i in range(ctx.bit_length() + 1)})
        counts = sorted({min(1 << i, self.slots) for i in range(self.slots.bit_length() + 1)})
        shapes = [(k, bucket) for k in counts for bucket in buckets
                  if self.prefill_fits([bucket] * k)]
        for i, length in enumerate(self.cache_lengths):
            self._hold(length, shrink=True)
            shorter = self.cache_lengths[i - 1] if i else 0
            for k, bucket in shapes:
                # each batch shape once; then one row per bucket for the insertion
                if shorter < bucket <= length or (k == 1 and bucket <= length):
                    self.prefill(list(range(k)), [[0] * bucket] * k)
            for rows in self.buckets:
                zeros = np.zeros(rows)
                self._decode(rows, np.ones(rows, bool), zeros, zeros + 1.0, zeros, zeros)
        self._hold(1, shrink=True)  # and every shrinking resize
        self.cached[:] = 0
        self.rows_decoded.clear()
        self.lengths_decoded.clear()
