"""Log-likelihoods of token sequences on the batched forward.

    rows = [Scored(tokens, n) ...]         # score the last n of each row's tokens
    results = score(params, config, rows)  # (sum of log-probabilities, all greedy, count)

The one scorer that both the sliding-window perplexity (`perplexity.py`) and
the lm-evaluation-harness model (`harness.py`) call: each row is a token
sequence whose last `n` tokens are scored given everything before them.
Rows are sorted by length, padded to a few bucket widths (`_bucket`) and
run in fixed-size batches, so a whole evaluation compiles a handful of times;
only the scored positions go through the LM head.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import GPTConfig
from jaxllm.model import apply, cast_params, lm_head


class Scored(NamedTuple):
    """A token sequence and how many of its last tokens to score (each given
    the tokens before it; the first token is never scored)."""

    tokens: Sequence[int]
    n_scored: int


class Score(NamedTuple):
    logprob: float  # the sum of the scored tokens' log-probabilities
    greedy: bool  # every scored token was the model's argmax
    count: int  # tokens scored


@partial(jax.jit, static_argnames="config")
def _score_batch(params, inputs, positions, targets, mask, *, config: GPTConfig):
    """Per row: the masked sum of log p(target) over the hidden states at
    `positions`, and whether every masked target was the argmax. Only the
    scored positions go through the head (its vocabulary-wide product
    dominates a small model's cost)."""
    hidden = apply(params, inputs, config, return_hidden=True)
    hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)
    logits = lm_head(cast_params(params, config), hidden, config)
    logits = logits[..., : config.vocab_size].astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    greedy = (jnp.argmax(logits, axis=-1) == targets) | ~mask
    return jnp.sum(jnp.where(mask, picked, 0.0), axis=-1), jnp.all(greedy, axis=-1)


def _bucket(width: int, limit: int, smallest: int = 16) -> int:
    """A padded width, capped at `limit`: the next power of two from `smallest`
    up to 64, then the next multiple of 64 (padding wastes at most a third of
    a long batch, at one compilation per width)."""
    if width > 64:
        return min(limit, -(-width // 64) * 64)
    return min(limit, max(smallest, 1 << (max(width, 1) - 1).bit_length()))


def score(params, config: GPTConfig, rows: Sequence[Scored], *, batch_size: int = 8,
          progress=None) -> list[Score]:
    """The `Score` of each row, in the rows' order. A row's input (all but its
    last token) must fit the context; `progress(n)` is called after each batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i, (tokens, n) in enumerate(rows):
        if not 1 <= len(tokens) - 1 <= config.context_length:
            raise ValueError(f"row {i}: {len(tokens)} tokens; a scored row needs 2 to "
                             f"{config.context_length + 1} (the context length + 1)")
        if not 0 <= n <= len(tokens) - 1:
            raise ValueError(f"row {i}: {n} tokens to score of {len(tokens)} (at most "
                             f"{len(tokens) - 1}: the first token is never scored)")
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))
    out: list[Score | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = _bucket(len(rows[chunk[0]].tokens) - 1, config.context_length)
        k = _bucket(max(rows[i].n_scored for i in chunk), width, smallest=1)
        inputs = np.zeros((batch_size, width), np.int32)
        positions = np.zeros((batch_size, k), np.int32)
        targets = np.zeros((batch_size, k), np.int32)
        mask = np.zeros((batch_size, k), bool)
        for r, i in enumerate(chunk):  # the scored positions at the right of the k slots
            tokens, n = np.asarray(rows[i].tokens, np.int32), rows[i].n_scored
            t = len(tokens) - 1
            inputs[r, :t] = tokens[:-1]
            if n:
                positions[r, k - n:] = np.arange(t - n, t)
                targets[r, k - n:] = tokens[t - n + 1:]
                mask[r, k - n:] = True
        logprob, greedy = jax.device_get(_score_batch(params, inputs, positions, targets, mask,
                                                      config=config))
        for r, i in enumerate(chunk):
            out[i] = Score(float(logprob[r]), bool(greedy[r]), rows[i].n_scored)
        if progress is not None:
            progress(len(chunk))
    return out  # type: ignore[return-value]
