"""Tokenizers behind one small interface: encode, decode, vocab_size, eot_id.

- `ByteTokenizer`: the 256 byte values plus an end-of-text id; needs no files.
- `GPT2Tokenizer`: GPT-2's byte-level BPE through tiktoken, built from local
  vocabulary files (`gpt2.tiktoken`, or `encoder.json` + `vocab.bpe`) found in
  a directory given as an argument or in `$JAXLLM_GPT2_DIR`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Protocol

GPT2_DIR_ENV = "JAXLLM_GPT2_DIR"
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_EOT = "<|endoftext|>"


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str, *, allow_eot: bool = False) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, end-of-text as 256."""

    name = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str, *, allow_eot: bool = False) -> list[int]:
        if not allow_eot:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        for i, part in enumerate(text.split(_EOT)):
            if i:
                ids.append(self.eot_id)
            ids.extend(part.encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        out, chunk = [], bytearray()
        for i in ids:
            i = int(i)
            if i == self.eot_id:
                out.append(chunk.decode("utf-8", errors="replace") + _EOT)
                chunk = bytearray()
            elif 0 <= i < 256:
                chunk.append(i)
            else:
                raise ValueError(f"token id {i} is outside the byte vocabulary [0, {self.vocab_size})")
        out.append(chunk.decode("utf-8", errors="replace"))
        return "".join(out)


class GPT2Tokenizer:
    """GPT-2's 50,257-token byte-level BPE (tiktoken)."""

    name = "gpt2"
    vocab_size = 50257
    eot_id = 50256

    def __init__(self, directory: str | os.PathLike | None = None):
        self._enc = _gpt2_encoding(directory)

    def encode(self, text: str, *, allow_eot: bool = False) -> list[int]:
        if allow_eot:
            return self._enc.encode(text, allowed_special={_EOT})
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the GPT-2 vocabulary [0, {self.vocab_size})")
        return self._enc.decode(ids)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self._enc.decode_bytes([int(i) for i in ids])


def _gpt2_encoding(directory):
    import tiktoken

    directory = directory if directory is not None else os.environ.get(GPT2_DIR_ENV)
    how = (f"pass the directory that holds gpt2.tiktoken (or encoder.json and vocab.bpe), "
           f"e.g. --tokenizer-dir PATH, or set ${GPT2_DIR_ENV}")
    if directory is None:
        try:  # online users: tiktoken downloads and caches the files itself
            return tiktoken.get_encoding("gpt2")
        except Exception as err:
            raise FileNotFoundError(f"GPT-2 vocabulary files not found and could not be "
                                    f"downloaded ({type(err).__name__}); {how}") from None
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"GPT-2 tokenizer directory {d} does not exist; {how}")
    try:
        if (d / "gpt2.tiktoken").exists():
            ranks = _tiktoken_ranks(d / "gpt2.tiktoken")
        elif (d / "encoder.json").exists() and (d / "vocab.bpe").exists():
            ranks = _data_gym_ranks(d / "vocab.bpe", d / "encoder.json")
        else:
            raise FileNotFoundError(f"{d / 'gpt2.tiktoken'} not found (nor encoder.json + "
                                    f"vocab.bpe); {how}")
    except _Damaged as err:
        raise ValueError(f"the GPT-2 vocabulary in {d} is damaged: {err}") from None
    return tiktoken.Encoding(name="gpt2", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={_EOT: 50256}, explicit_n_vocab=50257)


# The vocabulary files are read here rather than by tiktoken's loaders: those
# check with bare asserts (which file is at fault goes unsaid) and keep a copy
# of every file they read in a cache keyed by its path, so a damaged file
# replaced with a good one would still be read as damaged.
_N_RANKS = 50256  # GPT-2's mergeable tokens: 256 bytes and 50,000 merges
_REPLACE = "replace the file with GPT-2's own"


class _Damaged(Exception):
    """A vocabulary file that cannot be GPT-2's; the message names the file."""


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise _Damaged(f"{path.name} cannot be read ({err.strerror})") from None


def _check_ranks(path: Path, ranks: dict[bytes, int], what: str) -> None:
    """Every rank 0.._N_RANKS-1 once: what tiktoken's encoder needs."""
    if len(ranks) != _N_RANKS:
        raise _Damaged(f"{path.name} holds {len(ranks)} {what} where GPT-2 has {_N_RANKS}; "
                       f"{_REPLACE}")
    if set(ranks.values()) != set(range(_N_RANKS)):
        raise _Damaged(f"{path.name} does not number its tokens 0 to {_N_RANKS - 1}; {_REPLACE}")


def _tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """The ranks of a `gpt2.tiktoken` file: one base64 token and its rank a line."""
    import base64
    import binascii

    ranks = {}
    for number, line in enumerate(_read(path).splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise _Damaged(f"{path.name} line {number} is not a base64 token and its rank; "
                           f"{_REPLACE}") from None
    _check_ranks(path, ranks, "tokens")
    return ranks


def _byte_alphabet() -> tuple[list[int], dict[str, int]]:
    """GPT-2's byte order for the first 256 ranks, and the printable character
    that stands for each byte in encoder.json and vocab.bpe."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    stand_in = {chr(b): b for b in printable}
    stand_in.update({chr(256 + n): b for n, b in enumerate(others)})
    return printable + others, stand_in


def _data_gym_ranks(vocab_bpe: Path, encoder_json: Path) -> dict[bytes, int]:
    """The ranks the merges of `vocab.bpe` give, checked against `encoder.json`
    as tiktoken checks them; each file alone first, so that the message names
    the one at fault, and only then the two against each other."""
    import json

    order, stand_in = _byte_alphabet()

    def as_bytes(token: str) -> bytes:
        return bytes(stand_in[c] for c in token)

    try:
        text = _read(vocab_bpe).decode("utf-8")
    except UnicodeDecodeError:
        raise _Damaged(f"{vocab_bpe.name} is not UTF-8 text; {_REPLACE}") from None
    ranks = {bytes([b]): i for i, b in enumerate(order)}
    merges = text.split("\n")[1:-1]  # a version line first, a newline last
    for number, line in enumerate(merges, 2):
        try:
            first, second = line.split()
            ranks[as_bytes(first) + as_bytes(second)] = len(ranks)
        except (ValueError, KeyError):
            raise _Damaged(f"{vocab_bpe.name} line {number} is not a merge of two tokens; "
                           f"{_REPLACE}") from None
    if len(merges) != _N_RANKS - 256:
        raise _Damaged(f"{vocab_bpe.name} holds {len(merges)} merges where GPT-2 has "
                       f"{_N_RANKS - 256}; {_REPLACE}")
    _check_ranks(vocab_bpe, ranks, "distinct tokens (its merges and the 256 bytes)")

    try:
        encoder = json.loads(_read(encoder_json))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _Damaged(f"{encoder_json.name} is not valid JSON ({err}); {_REPLACE}") from None
    try:
        if not isinstance(encoder, dict) or not all(type(v) is int for v in encoder.values()):
            raise TypeError
        # special tokens are no merges (tiktoken adds end-of-text itself)
        read = {as_bytes(k): v for k, v in encoder.items() if k not in (_EOT, "<|startoftext|>")}
    except (TypeError, KeyError):
        raise _Damaged(f"{encoder_json.name} is not an object of GPT-2 tokens and their ids; "
                       f"{_REPLACE}") from None
    _check_ranks(encoder_json, read, "tokens besides end-of-text")
    if read != ranks:
        token = next(t for t in ranks if read.get(t) != ranks[t])
        raise _Damaged(f"{vocab_bpe.name} and {encoder_json.name} do not agree (token "
                       f"{token!r} is number {ranks[token]} in one, {read.get(token)} in the "
                       f"other); replace both with GPT-2's own")
    return ranks


def get_tokenizer(name: str = "byte", directory: str | os.PathLike | None = None) -> Tokenizer:
    """`"byte"` or `"gpt2"` (with an optional vocabulary directory)."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer(directory)
    raise ValueError(f"unknown tokenizer {name!r}; choose 'byte' or 'gpt2'")
