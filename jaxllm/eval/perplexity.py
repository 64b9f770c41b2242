"""Perplexity of text longer than the context, with a sliding window: the
method of Hugging Face's perplexity guide, so the numbers compare with theirs.

Windows of `context_length` tokens start every `stride` tokens; each scores
only the tokens that the previous window did not (the last `trg_len` of its
window, each predicted from everything before it in the window), and the
first window's first token, having no context, is never scored. The
negative log-likelihood is summed over the scored tokens and divided by their
number (the guide's own tally subtracts one token per window, which
undercounts overlapping windows, whose first scored token has context). With
stride = context_length the windows do not overlap (fast, less
context per token); a smaller stride gives every token more context. Every
window is padded to the context length so the model compiles once.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import GPTConfig
from jaxllm.loss import token_loss_sum
from jaxllm.model import Params, apply


class Perplexity(NamedTuple):
    nll_sum: float   # summed negative log-likelihood of the scored tokens (nats)
    tokens: int      # tokens scored
    windows: int     # model calls

    @property
    def loss(self) -> float:
        """The mean negative log-likelihood per scored token."""
        return self.nll_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


@partial(jax.jit, static_argnames=("config",))
def _window_nll(params: Params, tokens, first_scored, length, *, config: GPTConfig):
    """(sum, count) of the NLL of tokens[j + 1] for first_scored <= j + 1 < length."""
    logits = apply(params, tokens[None, :-1], config)[0, :, : config.vocab_size]
    j = jnp.arange(1, tokens.shape[0])
    mask = (j >= first_scored) & (j < length)
    return token_loss_sum(logits, tokens[1:], mask)


def sliding_window_perplexity(params: Params, config: GPTConfig, ids, *,
                              stride: int | None = None) -> Perplexity:
    """The sliding-window perplexity of the token ids `ids` (see the module
    docstring); `stride` defaults to the context length."""
    ids = np.asarray(ids, np.int32).reshape(-1)
    ctx = config.context_length
    stride = ctx if stride is None else stride
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= ctx:
        raise ValueError(f"stride must be an int from 1 to the context length {ctx}, "
                         f"got {stride!r}")
    if ids.size < 2:
        raise ValueError(f"the text has {ids.size} token(s); perplexity needs at least 2")
    total, count, windows, prev_end = 0.0, 0, 0, 0
    for begin in range(0, ids.size, stride):
        end = min(begin + ctx, ids.size)
        window = np.zeros(ctx + 1, np.int32)  # + 1: the input is window[:-1]
        window[: end - begin] = ids[begin:end]
        first = max(end - begin - (end - prev_end), 1)  # the window's first scored position
        s, n = _window_nll(params, jnp.asarray(window), first, end - begin, config=config)
        total, count, windows = total + float(s), count + int(n), windows + 1
        prev_end = end
        if end == ids.size:
            break
    return Perplexity(total, count, windows)
