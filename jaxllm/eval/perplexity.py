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
context per token); a smaller stride gives every token more context. The
windows are independent, so they are scored `batch_size` at a time by
`jaxllm.eval.score` (the full-width ones in one compiled shape).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from jaxllm.config import GPTConfig
from jaxllm.eval.score import Scored, score
from jaxllm.model import Params


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


def sliding_window_perplexity(params: Params, config: GPTConfig, ids, *,
                              stride: int | None = None, batch_size: int = 8) -> Perplexity:
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
    rows, prev_end = [], 0
    for begin in range(0, ids.size, stride):
        end = min(begin + ctx, ids.size)
        # the tokens past the previous window, each given the window before it
        rows.append(Scored(ids[begin:end], min(end - prev_end, end - begin - 1)))
        prev_end = end
        if end == ids.size:
            break
    scores = score(params, config, rows, batch_size=batch_size)
    return Perplexity(-math.fsum(s.logprob for s in scores), sum(s.count for s in scores),
                      len(rows))
