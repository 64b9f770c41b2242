"""Text generation: a key-value cache, greedy decoding and sampling.

`generate` runs the model once over the prompt (the *prefill*), keeping every
layer's keys and values in a cache preallocated to `context_length`, then
produces one token per step by running the model on that token alone and
attending over the cache (the *decode*). The model's own `block` does all the
work, with the cached attention passed in as its `attend`; this module adds
only that attention step and the cache.

Shapes are fixed so that nothing recompiles from call to call:

- prompts are right-padded to a bucket (a power of two, at least 16, at most
  `context_length`): one prefill compilation per bucket;
- the decode runs as a `lax.while_loop` over chunks of `chunk_size` tokens,
  with the number of steps a traced value: `max_new_tokens` is not in any
  shape, and the host checks "all sequences finished" once per chunk rather
  than once per token.

Batches of different-length prompts are right-padded: each sequence keeps its
own position, so its tokens and logits are those it would get alone.

Past the context: once a sequence fills all `context_length` cache slots, the
next token needs the model on the last `context_length` tokens with positions
renumbered from 0 (the window slides). Every cached key and value depends on
its position, so the cache is recomputed over that window at each such step:
exactly what the classic loop that crops the context computes, at its cost.
(The decode loop stops after a step that slides; a separate jitted function,
compiled once, recomputes the cache, and the loop resumes. Keeping that
branch out of the loop keeps the cache updates in place.)
With `allow_slide=False` a request that would run past the context is a
ValueError instead.

`generate_simple` is that classic uncached loop, the reference for tests and
benchmarks.
"""

from __future__ import annotations

import collections
import math
from functools import partial
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import GPTConfig
from jaxllm.model import Params, apply, block, cast_params, embed, lm_head, norm

MIN_BUCKET = 16
_MASK_VALUE = -1e30  # finite, so a fully masked row cannot produce NaN
TOP_P_TOLERANCE = 1e-6  # float32 rounding when deciding that a set's mass "reaches" p

# Counts how often each jitted function is traced (a Python side effect that
# runs only while tracing), so tests can check that nothing recompiles.
TRACE_COUNTS: collections.Counter = collections.Counter()


class Generation(NamedTuple):
    """What `generate` returns.

    tokens:  (batch, max_new_tokens) int32 new tokens; after a sequence's
             `eos_id` every position holds `eos_id`.
    lengths: (batch,) int32 new tokens per sequence, counting its eos
             (`max_new_tokens` for a sequence that never produced one).
    logits:  (batch, max_new_tokens, vocab_size) float32 logits each token
             was chosen from, when asked for (`return_logits=True`), else
             None. Positions after a sequence's eos hold no meaning.
    """

    tokens: np.ndarray
    lengths: np.ndarray
    logits: np.ndarray | None = None


class KVCache(NamedTuple):
    """Keys and values of every layer, one array per layer.

    keys (batch, kv_heads, head_dim, context_length) are stored transposed and
    values (batch, kv_heads, context_length, head_dim) as they are, so that both
    attention products read the cache in its stored layout, with no copy.
    Only the `kv_heads` key/value heads are kept (grouped-query attention
    shares each among n_heads / kv_heads query heads), and keys are cached
    after RoPE, at their absolute positions. Bytes per token:
    `cache_bytes_per_token`, 2 * n_layers * kv_heads * head_dim * itemsize;
    Llama-3.2-1B in bf16: 2 x 16 x 8 x 64 x 2 bytes = 32 KiB.
    """

    keys: list
    values: list


class DecodeState(NamedTuple):
    """Everything the decode loop carries from one token to the next."""

    cache: KVCache
    window: jax.Array   # (batch, context_length) the tokens whose keys/values are cached
    length: jax.Array   # (batch,) tokens in the window
    logits: jax.Array   # (batch, vocab_size) logits for each sequence's next token
    done: jax.Array     # (batch,) the sequence has produced eos
    step: jax.Array     # () tokens generated so far (the sampling key is folded with it)
    stale: jax.Array    # () a window slid: the cache and logits need `_refresh`


# -- sampling ----------------------------------------------------------------
def top_p_filter(logits, top_p):
    """Keep the smallest set of most likely tokens whose probability reaches
    `top_p` (nucleus filtering); the others get logit -inf.

    A token is kept when the probability of the tokens ranked above it is
    still below `top_p` (within `TOP_P_TOLERANCE`), so the most likely token
    is always kept; `top_p` >= 1 keeps every token. Tokens tied with the
    least likely kept one are kept too. `top_p` may be a traced value.
    """
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    n_keep = jnp.sum(mass_before < top_p - TOP_P_TOLERANCE, axis=-1, keepdims=True)
    n_keep = jnp.where(top_p >= 1.0, logits.shape[-1], jnp.maximum(n_keep, 1))
    cutoff = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def top_k_filter(logits, top_k):
    """Keep the `top_k` largest logits (and any tied with the k-th); the others
    get -inf. `top_k` may be a traced value; above the vocabulary it keeps all."""
    k = jnp.clip(top_k, 1, logits.shape[-1])
    kth = jnp.take_along_axis(jnp.sort(logits, axis=-1)[..., ::-1],
                              jnp.broadcast_to(k - 1, logits.shape[:-1] + (1,)), axis=-1)
    return jnp.where(logits >= kth, logits, -jnp.inf)


class Sampler(NamedTuple):
    """How the next token is drawn. The fields are traced values, so changing
    them does not recompile; which filters are on is static (`filters`)."""

    temperature: jax.Array  # () float32, > 0
    top_k: jax.Array        # () int32
    top_p: jax.Array        # () float32


def sample_next(logits, key, sampler: Sampler | None, *,
                filters: tuple[bool, bool] = (False, False)):
    """Next token ids (batch,) from logits (batch, vocab).

    `sampler=None` is greedy (the argmax). Otherwise the logits are divided by
    the temperature, filtered by top-k then top-p (each only if its flag in
    `filters` is set) and one token is drawn with `key`.
    """
    if sampler is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    use_top_k, use_top_p = filters
    logits = logits / sampler.temperature
    if use_top_k:
        logits = top_k_filter(logits, sampler.top_k)
    if use_top_p:
        logits = top_p_filter(logits, sampler.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _sampler(temperature: float, top_k, top_p) -> tuple[Sampler | None, tuple[bool, bool]]:
    """The traced sampling settings (None when greedy) and the static filter flags."""
    if float(temperature) == 0.0:
        return None, (False, False)
    sampler = Sampler(jnp.float32(temperature), jnp.int32(top_k if top_k is not None else 1),
                      jnp.float32(top_p if top_p is not None else 1.0))
    return sampler, (top_k is not None, top_p is not None)


# -- the cached forward pass -------------------------------------------------
def cached_attention(q, k, v, cache_k, cache_v, start):
    """Attention of the new tokens' queries over the cached past and themselves.

    q (batch, seq, heads, head_dim) and k, v (batch, seq, kv_heads,
    head_dim) are the new tokens, which sit at positions start.. (`start` ()
    or (batch,)); they see the cache slots before `start` (keys (batch,
    kv_heads, head_dim, slots), values (batch, kv_heads, slots, head_dim))
    and, causally, each other. Query head i reads key/value head i // groups
    (the group axis g below; 1 without grouped-query attention). Reading the
    cache as it was before this step's write lets XLA update it in place.
    With `start` the int 0 (a prefill) there is no past and the cache is
    not read.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scale = 1.0 / math.sqrt(d)
    new = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) * scale
    new = jnp.where(jnp.tril(jnp.ones((t, t), bool)), new, _MASK_VALUE)
    if isinstance(start, int) and start == 0:  # a prefill: no past to read
        weights = jax.nn.softmax(new, axis=-1).astype(v.dtype)
        return jnp.einsum("bkgts,bskd->btkgd", weights, v).reshape(b, t, h, d)
    past = jnp.einsum("btkgd,bkdc->bkgtc", q, cache_k).astype(jnp.float32) * scale
    start = jnp.broadcast_to(start, (b,))
    before = jnp.arange(cache_k.shape[3])[None, :] < start[:, None]  # (batch, slots)
    past = jnp.where(before[:, None, None, None, :], past, _MASK_VALUE)
    weights = jax.nn.softmax(jnp.concatenate([past, new], axis=-1), axis=-1)
    w_past, w_new = weights[..., :-t].astype(v.dtype), weights[..., -t:].astype(v.dtype)
    return (jnp.einsum("bkgtc,bkcd->btkgd", w_past, cache_v)
            + jnp.einsum("bkgts,bskd->btkgd", w_new, v)).reshape(b, t, h, d)


def _write(cache_layer, new, start, slot_axis: int):
    """Write `new` (in the cache's layout) at slot `start` along `slot_axis`:
    one offset () for every row, or one per row (batch,).

    One offset is a `dynamic_update_slice`; one per row is a single scatter
    of each row's positions (one op, whatever the batch). XLA performs both
    in place on a donated cache.
    """
    new = new.astype(cache_layer.dtype)
    if jnp.ndim(start) == 0:
        offsets = [0, 0, 0, 0]
        offsets[slot_axis] = start
        return jax.lax.dynamic_update_slice(cache_layer, new, offsets)
    # index arrays (batch, seq) of rows and positions; the update's axes are
    # theirs first, then the cache's heads and head_dim
    positions = start[:, None] + jnp.arange(new.shape[slot_axis])
    rows = jnp.broadcast_to(jnp.arange(new.shape[0])[:, None], positions.shape)
    if slot_axis == 3:
        return cache_layer.at[rows, :, :, positions].set(new.transpose(0, 3, 1, 2),
                                                         mode="promise_in_bounds")
    return cache_layer.at[rows, :, positions, :].set(new.transpose(0, 2, 1, 3),
                                                     mode="promise_in_bounds")


def _after(x, dependency):
    """`x`, made to depend on `dependency` (adds 0 * its sum).

    The attention reads the cache and the new keys and values are written
    into it in place. Unless the write depends on the read's result, XLA
    cannot tell which comes first and copies the whole cache every step;
    this cheap dependency orders them.
    """
    return x + 0.0 * dependency.sum().astype(x.dtype)


def _forward_cached(p: Params, tokens, positions, start, cache, config: GPTConfig):
    """The model on tokens (batch, seq) at `positions` (batch, seq), which run
    consecutively from `start` (one () for all rows, or (batch,)): writes
    their keys and values into the cache and attends over it. Returns the
    final hidden states (batch, seq, emb), before the final norm, and
    the new cache.

    `cache` is a KVCache of the batch's rows, or a list of KVCaches that
    split a larger batch into consecutive groups of rows (a server's slots):
    the tokens are then the rows of the first groups, exactly, and the later
    groups are neither read nor written. Each group is attended and written
    as it is stored, so running on the first rows copies nothing (a slice of
    one large cache would be copied at every step)."""
    groups = [cache] if isinstance(cache, KVCache) else list(cache)
    batch, bounds = tokens.shape[0], []
    while sum(n for _, n in bounds) < batch:
        bounds.append((sum(n for _, n in bounds), groups[len(bounds)].keys[0].shape[0]))
    if sum(n for _, n in bounds) != batch:
        raise ValueError(f"a batch of {batch} rows does not fill the cache's first groups "
                         f"({[n for _, n in bounds]} rows)")
    x = embed(p, tokens, config, positions=positions).astype(jnp.dtype(config.compute_dtype))
    keys, values = [[] for _ in bounds], [[] for _ in bounds]
    for layer, blk in enumerate(p["blocks"]):
        def attend(q, k, v, layer=layer):
            out = []
            for g, (lo, n) in enumerate(bounds):
                ck, cv = groups[g].keys[layer], groups[g].values[layer]
                at = start if jnp.ndim(start) == 0 else start[lo:lo + n]
                rows = slice(lo, lo + n)
                a = cached_attention(q[rows], k[rows], v[rows], ck, cv, at)
                kg, vg = _after(k[rows], a), _after(v[rows], a)
                keys[g].append(_write(ck, kg.transpose(0, 2, 3, 1), at, slot_axis=3))
                values[g].append(_write(cv, vg.transpose(0, 2, 1, 3), at, slot_axis=2))
                out.append(a)
            return out[0] if len(out) == 1 else jnp.concatenate(out)

        x = block(blk, x, config, attend=attend, positions=positions)
    new = [KVCache(k, v) for k, v in zip(keys, values)] + groups[len(bounds):]
    return x, new[0] if isinstance(cache, KVCache) else new


def _logits_at(p: Params, hidden, index, config: GPTConfig):
    """Logits (batch, vocab_size) of the hidden state at `index` (batch,) in each row."""
    h = norm(p["final_norm"], hidden[jnp.arange(hidden.shape[0]), index][:, None], config)
    return lm_head(p, h, config)[:, 0, : config.vocab_size]


def _prefill_into(p: Params, tokens, length, cache: KVCache, config: GPTConfig):
    """Run right-padded tokens (batch, seq) from position 0 into the cache;
    logits after each row's last real token."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    hidden, cache = _forward_cached(p, tokens, positions, 0, cache, config)
    return cache, _logits_at(p, hidden, length - 1, config)


def cache_bytes_per_token(config: GPTConfig) -> int:
    """Bytes the KV cache holds per token of one sequence: a key and a value of
    `kv_heads` heads of `head_dim` in every layer, in the compute dtype."""
    itemsize = jnp.dtype(config.compute_dtype).itemsize
    return 2 * config.n_layers * config.kv_heads * config.head_dim * itemsize


def empty_cache(config: GPTConfig, batch: int, positions: int | None = None) -> KVCache:
    """Zeros for `batch` sequences of `positions` tokens (default: the context)."""
    h, d = config.kv_heads, config.head_dim
    c = config.context_length if positions is None else positions
    dtype = jnp.dtype(config.compute_dtype)
    return KVCache([jnp.zeros((batch, h, d, c), dtype) for _ in range(config.n_layers)],
                   [jnp.zeros((batch, h, c, d), dtype) for _ in range(config.n_layers)])


@partial(jax.jit, static_argnames=("config", "bucket"))
def _prefill(params: Params, window, length, *, config: GPTConfig, bucket: int) -> DecodeState:
    """The decode state after the prompts: one compilation per (batch, bucket)."""
    TRACE_COUNTS["prefill"] += 1
    p = cast_params(params, config)
    cache = empty_cache(config, window.shape[0])
    cache, logits = _prefill_into(p, window[:, :bucket], length, cache, config)
    batch = window.shape[0]
    return DecodeState(cache, window, length, logits, jnp.zeros((batch,), bool),
                       jnp.zeros((), jnp.int32), jnp.zeros((), bool))


def _feed(p: Params, st: DecodeState, token, active, config: GPTConfig) -> DecodeState:
    """Append `token` (batch,) to the active sequences and compute their next logits.

    A sequence whose window is full slides it by one token instead, which
    makes every cached key and value stale: the state is then flagged
    `stale`, and `_refresh` must recompute the cache before the next step.
    """
    ctx = config.context_length
    rows = jnp.arange(token.shape[0])
    full = st.length >= ctx
    slide = active & full
    pos = jnp.where(full, ctx - 1, st.length)
    window = jnp.where(slide[:, None], jnp.roll(st.window, -1, axis=1), st.window)
    window = window.at[rows, pos].set(jnp.where(active, token, window[rows, pos]))
    length = jnp.where(active & ~full, st.length + 1, st.length)
    hidden, cache = _forward_cached(p, token[:, None], pos[:, None], pos, st.cache, config)
    logits = _logits_at(p, hidden, jnp.zeros_like(pos), config)
    return st._replace(cache=cache, window=window, length=length, logits=logits,
                       stale=jnp.any(slide))


@partial(jax.jit, donate_argnames=("state",), static_argnames=("config",))
def _refresh(params: Params, state: DecodeState, *, config: GPTConfig) -> DecodeState:
    """Recompute the cache and the next logits over the (slid) windows, from
    position 0. Rows that did not slide get the same keys and values again."""
    TRACE_COUNTS["refresh"] += 1
    p = cast_params(params, config)
    cache, logits = _prefill_into(p, state.window, state.length, state.cache, config)
    return state._replace(cache=cache, logits=logits, stale=jnp.zeros((), bool))


@partial(jax.jit, donate_argnames=("state",),
         static_argnames=("config", "chunk", "filters", "eos_id", "with_logits"))
def _decode_chunk(params: Params, state: DecodeState, rng, sampler: Sampler | None, n_steps, *,
                  config: GPTConfig, chunk: int, filters: tuple[bool, bool], eos_id,
                  with_logits: bool):
    """Up to `n_steps` (<= chunk) tokens in one while loop. Stops early when
    every sequence is done, or after a step that slid a window (the state is
    then stale). Returns the state, the steps taken, tokens (batch, chunk)
    and, if asked, their logits (batch, chunk, vocab_size)."""
    TRACE_COUNTS["decode"] += 1
    p = cast_params(params, config)
    batch = state.length.shape[0]
    pad = eos_id if eos_id is not None else 0
    tokens = jnp.full((batch, chunk), pad, jnp.int32)
    logits_out = jnp.zeros((batch, chunk if with_logits else 0, config.vocab_size), jnp.float32)

    def cond(carry):
        i, st, _, _ = carry
        return (i < n_steps) & ~jnp.all(st.done) & ~st.stale

    def body(carry):
        i, st, tokens, logits_out = carry
        key = jax.random.fold_in(rng, st.step)
        nxt = sample_next(st.logits, key, sampler, filters=filters)
        nxt = jnp.where(st.done, pad, nxt)
        tokens = tokens.at[:, i].set(nxt)
        if with_logits:
            logits_out = logits_out.at[:, i].set(st.logits)
        done = st.done | (nxt == eos_id) if eos_id is not None else st.done
        st = _feed(p, st._replace(done=done, step=st.step + 1), nxt, ~done, config)
        return i + 1, st, tokens, logits_out

    steps, state, tokens, logits_out = jax.lax.while_loop(
        cond, body, (jnp.zeros((), jnp.int32), state, tokens, logits_out))
    return state, steps, tokens, logits_out


# -- input checks --------------------------------------------------------------
def prompt_bucket(length: int, context_length: int) -> int:
    """The padded prompt length: the next power of two >= length (at least
    `MIN_BUCKET`), capped at `context_length`."""
    return min(max(MIN_BUCKET, 1 << max(0, length - 1).bit_length()), context_length)


def _prompt_rows(prompt_tokens, lengths) -> list[np.ndarray]:
    """The prompts as a list of 1-D int arrays (one per sequence)."""
    if isinstance(prompt_tokens, (list, tuple)):
        if len(prompt_tokens) == 0:
            raise ValueError("prompt_tokens is empty (no prompt)")
        if all(np.ndim(r) == 0 for r in prompt_tokens):
            rows = [np.asarray(prompt_tokens)]
        else:
            rows = [np.asarray(r) for r in prompt_tokens]
    else:
        arr = np.asarray(prompt_tokens)
        if arr.ndim == 1:
            rows = [arr]
        elif arr.ndim == 2:
            rows = list(arr)
        else:
            raise ValueError(f"prompt_tokens must be 1-D or 2-D, got shape {arr.shape}")
    if lengths is not None:
        lengths = [int(n) for n in np.asarray(lengths).reshape(-1)]
        if len(lengths) != len(rows):
            raise ValueError(f"lengths has {len(lengths)} entries for {len(rows)} prompts")
        for i, (n, r) in enumerate(zip(lengths, rows)):
            if not 0 <= n <= len(r):
                raise ValueError(f"lengths[{i}] = {n} is outside [0, {len(r)}] (the row's width)")
        rows = [r[:n] for r, n in zip(rows, lengths)]
    for i, r in enumerate(rows):
        if r.ndim != 1:
            raise ValueError(f"prompt {i} must be a flat list of token ids, got shape {r.shape}")
        if r.size == 0:
            raise ValueError(f"prompt {i} is empty (length 0)")
        if not np.issubdtype(r.dtype, np.integer):
            raise ValueError(f"prompt {i} must hold integer token ids, got dtype {r.dtype}")
    return rows


def _check_request(config: GPTConfig, rows, max_new_tokens, rng, temperature, top_k, top_p,
                   eos_id, allow_slide) -> None:
    for i, r in enumerate(rows):
        lo, hi = int(r.min()), int(r.max())
        if lo < 0 or hi >= config.vocab_size:
            raise ValueError(f"prompt {i} contains token id {lo if lo < 0 else hi}, outside "
                             f"[0, {config.vocab_size}) (vocab_size)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
        raise ValueError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    t = float(temperature)
    if not (t >= 0.0 and math.isfinite(t)):  # also rejects NaN
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                              or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and not (0.0 < float(top_p) <= 1.0):  # also rejects NaN
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if t > 0.0 and rng is None:
        raise ValueError(f"sampling (temperature={temperature}) needs an rng key")
    if eos_id is not None and not 0 <= int(eos_id) < config.vocab_size:
        raise ValueError(f"eos_id {eos_id} is outside [0, {config.vocab_size}) (vocab_size)")
    if not allow_slide:
        longest = max(len(r) for r in rows)
        if longest > config.context_length:
            raise ValueError(f"a prompt has {longest} tokens, more than the context length "
                             f"{config.context_length}, and allow_slide=False")
        if longest + max_new_tokens - 1 > config.context_length:
            raise ValueError(
                f"prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) - 1 exceeds the "
                f"context length {config.context_length}, and allow_slide=False")


def _finish(tokens: np.ndarray, logits, eos_id) -> Generation:
    n = tokens.shape[1]
    if eos_id is None or n == 0:
        lengths = np.full((tokens.shape[0],), n, np.int32)
    else:
        is_eos = tokens == eos_id
        lengths = np.where(is_eos.any(1), is_eos.argmax(1) + 1, n).astype(np.int32)
    return Generation(tokens, lengths, logits)


# -- the public API ------------------------------------------------------------
def generate_stream(params: Params, config: GPTConfig, prompt_tokens, max_new_tokens: int, *,
                    rng=None, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, eos_id: int | None = None, lengths=None,
                    allow_slide: bool = True, chunk_size: int = 64,
                    return_logits: bool = False) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Like `generate`, but yields the new tokens as they are produced: one
    `(tokens, logits)` pair per chunk of up to `chunk_size` steps (tokens
    (batch, n), logits (batch, n, vocab_size) or None; a chunk ends early
    when a window slides). `chunk_size=1` streams token by token. Stops
    early once every sequence has produced `eos_id`. Arguments are checked
    before the first token is computed."""
    rows = _prompt_rows(prompt_tokens, lengths)
    _check_request(config, rows, max_new_tokens, rng, temperature, top_k, top_p, eos_id,
                   allow_slide)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return _stream(params, config, rows, max_new_tokens, rng, float(temperature), top_k, top_p,
                   eos_id, chunk_size, return_logits)


def _stream(params, config, rows, max_new_tokens, rng, temperature, top_k, top_p, eos_id,
            chunk_size, return_logits):
    ctx = config.context_length
    rows = [r[-ctx:] for r in rows]  # what the cropping loop sees first
    window = np.zeros((len(rows), ctx), np.int32)
    for i, r in enumerate(rows):
        window[i, : len(r)] = r
    length = np.array([len(r) for r in rows], np.int32)
    sampler, filters = _sampler(temperature, top_k, top_p)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    eos_id = None if eos_id is None else int(eos_id)
    state = None
    produced = 0
    while produced < max_new_tokens:
        if state is None:
            bucket = prompt_bucket(int(length.max()), ctx)
            state = _prefill(params, jnp.asarray(window), jnp.asarray(length), config=config,
                             bucket=bucket)
        elif bool(state.stale):
            state = _refresh(params, state, config=config)
        n = min(chunk_size, max_new_tokens - produced)
        state, steps, tokens, logits = _decode_chunk(
            params, state, rng, sampler, jnp.int32(n), config=config, chunk=chunk_size,
            filters=filters, eos_id=eos_id, with_logits=return_logits)
        steps = int(steps)
        produced += steps
        yield (np.asarray(tokens[:, :steps]),
               np.asarray(logits[:, :steps]) if return_logits else None)
        if eos_id is not None and bool(jnp.all(state.done)):
            break


def generate(params: Params, config: GPTConfig, prompt_tokens, max_new_tokens: int, *,
             rng=None, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, eos_id: int | None = None, lengths=None,
             allow_slide: bool = True, chunk_size: int = 64,
             return_logits: bool = False) -> Generation:
    """Generate `max_new_tokens` tokens after each prompt, with a key-value cache.

    prompt_tokens: one prompt (a flat list or 1-D array of ids), several (a
        list of lists of any lengths), or a 2-D array whose rows are prompts,
        optionally right-padded with their true lengths given in `lengths`.
    temperature: 0 decodes greedily (argmax; `top_k`/`top_p` unused), > 0
        samples from softmax(logits / temperature), after keeping the
        `top_k` most likely tokens and then the nucleus of probability
        `top_p`. Sampling needs `rng`; the same key gives the same tokens.
        (The key for step i is `fold_in(rng, i)`, shared by the batch.)
    eos_id: a sequence that produces it is finished: its later tokens are
        `eos_id`. Generation ends early once every sequence is finished
        (checked every `chunk_size` tokens).
    allow_slide: past `context_length`, keep going with a sliding window
        (see the module docstring); False makes that a ValueError.
    return_logits: also return the logits each token was chosen from.

    Returns a `Generation(tokens, lengths, logits)` of numpy arrays, always
    with a batch axis. Changing the prompt lengths within a bucket,
    `max_new_tokens`, `temperature`, `top_k` or `top_p` does not recompile;
    the batch size, bucket, greediness, whether `top_k` / `top_p` are given,
    `eos_id`, `chunk_size` and `return_logits` are compile-time constants.
    """
    stream = generate_stream(params, config, prompt_tokens, max_new_tokens, rng=rng,
                             temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id,
                             lengths=lengths, allow_slide=allow_slide, chunk_size=chunk_size,
                             return_logits=return_logits)
    return _collect(stream, len(_prompt_rows(prompt_tokens, lengths)), max_new_tokens, config,
                    eos_id, return_logits)


def _collect(stream, batch, max_new_tokens, config, eos_id, return_logits) -> Generation:
    pad = eos_id if eos_id is not None else 0
    tokens = np.full((batch, max_new_tokens), pad, np.int32)
    logits = np.zeros((batch, max_new_tokens, config.vocab_size), np.float32) \
        if return_logits else None
    at = 0
    for chunk_tokens, chunk_logits in stream:
        n = chunk_tokens.shape[1]
        tokens[:, at:at + n] = chunk_tokens
        if return_logits:
            logits[:, at:at + n] = chunk_logits
        at += n
    return _finish(tokens, logits, eos_id)


# -- the uncached reference ----------------------------------------------------
@partial(jax.jit, static_argnames=("config", "filters"))
def _simple_step(params, tokens, length, key, sampler, *, config, filters):
    """The model on the whole (padded) sequence; the next token from the last real logits."""
    logits = apply(params, tokens, config)[0, length - 1, : config.vocab_size]
    nxt = sample_next(logits[None], key, sampler, filters=filters)
    return nxt[0], logits


def generate_simple(params: Params, config: GPTConfig, prompt_tokens, max_new_tokens: int, *,
                    rng=None, temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None, eos_id: int | None = None, lengths=None,
                    allow_slide: bool = True) -> Generation:
    """The classic loop without a cache: for each new token, crop the sequence
    to its last `context_length` tokens, run `jaxllm.model.apply` on all of
    it and take the last position's logits. One prompt at a time.

    Same arguments and result as `generate` (logits always returned). The
    sequence is right-padded to its power-of-two bucket before `apply`
    (causal attention makes the padding invisible) so that a few shapes are
    compiled, not one per length. With the same key a single prompt samples
    exactly as in `generate`.
    """
    rows = _prompt_rows(prompt_tokens, lengths)
    _check_request(config, rows, max_new_tokens, rng, temperature, top_k, top_p, eos_id,
                   allow_slide)
    ctx = config.context_length
    sampler, filters = _sampler(temperature, top_k, top_p)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    pad = eos_id if eos_id is not None else 0
    tokens = np.full((len(rows), max_new_tokens), pad, np.int32)
    logits = np.zeros((len(rows), max_new_tokens, config.vocab_size), np.float32)
    for b, row in enumerate(rows):
        seq = [int(t) for t in row]
        for i in range(max_new_tokens):
            window = seq[-ctx:]
            padded = np.zeros((1, prompt_bucket(len(window), ctx)), np.int32)
            padded[0, : len(window)] = window
            nxt, step_logits = _simple_step(
                params, jnp.asarray(padded), len(window), jax.random.fold_in(rng, i), sampler,
                config=config, filters=filters)
            tokens[b, i] = int(nxt)
            logits[b, i] = np.asarray(step_logits)
            if tokens[b, i] == eos_id:
                break
            seq.append(int(nxt))
    return _finish(tokens, logits, eos_id)
