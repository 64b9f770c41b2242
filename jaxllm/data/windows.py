"""The sliding-window dataset and its batches.

Window `i` starts at token `i * stride`: its inputs are `max_length` tokens
and its targets the same tokens shifted by one. A window needs
`max_length + 1` tokens, so a stream of `n` tokens gives
`len(range(0, n - max_length, stride))` windows.

Batches are addressed by a global index `k` (epoch `k // batches_per_epoch`,
position `k % batches_per_epoch`), each epoch with its own permutation drawn
from `(seed, epoch)`. The batch order is a pure function of `k`, so a resumed
run only needs the number of batches it has consumed.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np


def split_tokens(tokens: np.ndarray, train_ratio: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """The first `train_ratio` of a token stream for training, the rest for validation."""
    if not 0.0 < train_ratio <= 1.0:
        raise ValueError(f"train_ratio must be in (0, 1], got {train_ratio!r}")
    cut = int(train_ratio * len(tokens))
    return tokens[:cut], tokens[cut:]


class SlidingWindows:
    """(inputs, targets) windows of `max_length` tokens every `stride` tokens.

    `tokens` may be any 1-D integer array, an `np.memmap` included: windows
    are sliced on demand, nothing is copied up front.
    """

    def __init__(self, tokens: np.ndarray, max_length: int, stride: int | None = None,
                 *, name: str = "corpus"):
        stride = max_length if stride is None else stride
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) \
                or max_length <= 0:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride <= 0:
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        if np.ndim(tokens) != 1:
            raise ValueError(f"tokens must be a 1-D array, got shape {np.shape(tokens)}")
        n = len(tokens)
        if n == 0:
            raise ValueError(f"the {name} is empty: 0 tokens")
        if n < max_length + 1:
            raise ValueError(f"the {name} is too short: found {n} tokens, one window of "
                             f"max_length={max_length} needs at least {max_length + 1}")
        self.tokens, self.max_length, self.stride, self.name = tokens, int(max_length), int(stride), name
        self.starts = np.arange(0, n - max_length, stride, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s = int(self.starts[i])
        chunk = np.asarray(self.tokens[s:s + self.max_length + 1], dtype=np.int32)
        return chunk[:-1], chunk[1:]

    def batch(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """The windows at `indices` stacked: two int32 arrays (batch, max_length)."""
        pairs = [self[int(i)] for i in indices]
        return (np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]))


class WindowBatches:
    """Batches of windows, optionally shuffled per epoch by seed.

    `drop_last` drops the final partial batch of each epoch (training wants
    equal shapes); without it, that batch is smaller.
    """

    def __init__(self, windows: SlidingWindows, batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True):
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if drop_last and batch_size > len(windows):
            raise ValueError(f"batch_size {batch_size} is larger than the {len(windows)} windows of "
                             f"the {windows.name} (max_length={windows.max_length}, "
                             f"stride={windows.stride}) and drop_last would leave no batch")
        self.windows, self.batch_size = windows, int(batch_size)
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        n = len(windows)
        self.batches_per_epoch = n // batch_size if drop_last else -(-n // batch_size)
        self._order_cache: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def order(self, epoch: int) -> np.ndarray:
        """Window indices in the order epoch `epoch` visits them."""
        if not self.shuffle:
            return np.arange(len(self.windows))
        if self._order_cache is None or self._order_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order_cache = (epoch, rng.permutation(len(self.windows)))
        return self._order_cache[1]

    def batch_at(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The `k`-th batch counted from the start of epoch 0."""
        epoch, j = divmod(int(k), self.batches_per_epoch)
        idx = self.order(epoch)[j * self.batch_size:(j + 1) * self.batch_size]
        return self.windows.batch(idx)

    def epoch(self, epoch: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """All batches of one epoch."""
        for j in range(self.batches_per_epoch):
            yield self.batch_at(epoch * self.batches_per_epoch + j)

    def __iter__(self):
        return self.epoch(0)
