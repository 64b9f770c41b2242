"""Token files for corpora larger than memory.

`write_token_file` tokenises text once into a flat binary file of token ids
(uint16 when the vocabulary fits, else uint32) with a JSON sidecar
`<file>.json` holding the tokenizer name, dtype, vocabulary size and token
count. `TokenFile` maps it back with `np.memmap` (nothing is read until used)
and `RandomWindowBatches` draws windows at seeded random offsets.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

import numpy as np

from jaxllm.data.corpus import read_text_file
from jaxllm.tokenizer import Tokenizer

FORMAT_VERSION = 1
CHUNK_CHARS = 1 << 20  # text is encoded a megabyte at a time, cut at a line break


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def sidecar_path(path: str | os.PathLike) -> Path:
    return Path(str(path) + ".json")


def _chunks(text: str) -> Iterable[str]:
    """Pieces of about CHUNK_CHARS characters, each ending just after a newline
    so that no word is split between two encode calls."""
    start = 0
    while start < len(text):
        end = min(start + CHUNK_CHARS, len(text))
        if end < len(text):
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl >= start else end
        yield text[start:end]
        start = end


def write_token_file(path: str | os.PathLike, sources: Iterable[str | os.PathLike],
                     tokenizer: Tokenizer, *, errors: str = "strict") -> "TokenFile":
    """Tokenise text files (end-of-text between files) into a binary token file.

    The ids are streamed to `<path>.tmp` and renamed when complete, so a
    half-written file never passes for a finished one.
    """
    path = Path(path)
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with open(tmp, "wb") as out:
        for i, source in enumerate(sources):
            text = read_text_file(source, errors)
            if i:
                out.write(np.asarray([tokenizer.eot_id], dtype).tobytes())
                count += 1
            for piece in _chunks(text):
                ids = np.asarray(tokenizer.encode(piece), dtype)
                out.write(ids.tobytes())
                count += len(ids)
    header = {"format": FORMAT_VERSION, "tokenizer": tokenizer.name, "dtype": dtype.name,
              "vocab_size": tokenizer.vocab_size, "count": count}
    sidecar_path(path).write_text(json.dumps(header, indent=2) + "\n")
    os.replace(tmp, path)
    return TokenFile(path)


class TokenFile:
    """A token file opened read-only through `np.memmap`; `.tokens` is the array."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta = sidecar_path(self.path)
        if not self.path.is_file():
            raise FileNotFoundError(f"token file {self.path} does not exist")
        if not meta.is_file():
            raise FileNotFoundError(f"token file header {meta} does not exist")
        self.header = json.loads(meta.read_text())
        self.dtype = np.dtype(self.header["dtype"])
        self.count = int(self.header["count"])
        self.tokenizer = self.header["tokenizer"]
        size = self.path.stat().st_size
        if size != self.count * self.dtype.itemsize:
            raise ValueError(f"token file {self.path} holds {size} bytes, but its header says "
                             f"{self.count} tokens of {self.dtype.name} "
                             f"({self.count * self.dtype.itemsize} bytes)")
        self.tokens = (np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.count,))
                       if self.count else np.zeros((0,), self.dtype))

    def __len__(self) -> int:
        return self.count


class RandomWindowBatches:
    """Batches of windows at random offsets: batch `k` is drawn from `(seed, k)`,
    so any batch can be recomputed from its index alone (resumable)."""

    def __init__(self, tokens: np.ndarray, max_length: int, batch_size: int, *, seed: int = 0,
                 name: str = "corpus"):
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) \
                or max_length <= 0:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
                or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if len(tokens) < max_length + 1:
            raise ValueError(f"the {name} is too short: found {len(tokens)} tokens, one window of "
                             f"max_length={max_length} needs at least {max_length + 1}")
        self.tokens, self.max_length, self.batch_size, self.seed = tokens, max_length, batch_size, seed
        # A full pass over the tokens, for reporting epochs.
        self.batches_per_epoch = max(1, (len(tokens) - 1) // (max_length * batch_size))

    def batch_at(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(k)])
        starts = rng.integers(0, len(self.tokens) - self.max_length, size=self.batch_size)
        chunks = np.stack([np.asarray(self.tokens[s:s + self.max_length + 1], dtype=np.int32)
                           for s in starts])
        return chunks[:, :-1], chunks[:, 1:]
