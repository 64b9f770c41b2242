"""Tokenizers behind one small interface: encode, decode, vocab_size, eot_id.

- `ByteTokenizer`: the 256 byte values plus an end-of-text id; needs no files.
- `GPT2Tokenizer`: GPT-2's byte-level BPE through tiktoken, built from local
  vocabulary files (`gpt2.tiktoken`, or `encoder.json` + `vocab.bpe`) found in
  a directory given as an argument or in `$JAXLLM_GPT2_DIR`.
"""

from __future__ import annotations

import contextlib
import json
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
    if (d / "gpt2.tiktoken").exists():
        files = [d / "gpt2.tiktoken"]
    elif (d / "encoder.json").exists() and (d / "vocab.bpe").exists():
        files = [d / "vocab.bpe", d / "encoder.json"]
    else:
        raise FileNotFoundError(f"{d / 'gpt2.tiktoken'} not found (nor encoder.json + "
                                f"vocab.bpe); {how}")
    try:
        for f in files:
            if not f.is_file():
                raise _Damaged(f"{f.name} is not a file")
        ranks = _load_ranks(files)
    except OSError as err:
        raise ValueError(f"the GPT-2 vocabulary in {d} cannot be read: {err}") from None
    except _Damaged as err:
        raise ValueError(f"the GPT-2 vocabulary in {d} is damaged: {err}") from None
    return tiktoken.Encoding(name="gpt2", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={_EOT: 50256}, explicit_n_vocab=50257)


_N_RANKS = 50256  # GPT-2's mergeable tokens: 256 bytes and 50,000 merges
_REPLACE = "replace the file with GPT-2's own"


class _Damaged(Exception):
    """A vocabulary file that cannot be GPT-2's; the message names the file."""


@contextlib.contextmanager
def _no_tiktoken_cache():
    """tiktoken keeps a copy of every file it reads, keyed by its path: a damaged
    file put right would go on being read as damaged. An empty cache directory
    is tiktoken's switch to read the file itself."""
    before = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if before is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = before


def _load_ranks(files: list[Path]) -> dict[bytes, int]:
    """The merge ranks, read by tiktoken. tiktoken checks the two data-gym files
    against each other with bare asserts, so each file is first checked alone:
    the message then names the one at fault."""
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe

    def count(path, n, what, expected):
        if n != expected:
            raise _Damaged(f"{path.name} holds {n:,} {what} where GPT-2 has {expected:,}; "
                           f"{_REPLACE}")

    def numbered(path, ranks):  # tiktoken's encoder panics on a repeated or missing rank
        if set(ranks.values()) != set(range(len(ranks))):
            raise _Damaged(f"{path.name} does not number its tokens 0 to {len(ranks) - 1}, "
                           f"each once; {_REPLACE}")

    if len(files) == 1:
        with _no_tiktoken_cache():
            try:
                ranks = load_tiktoken_bpe(str(files[0]))
            except ValueError as err:  # names the line it could not parse
                raise _Damaged(f"{files[0].name} has a line that is not a base64 token and its "
                               f"rank ({str(err)[:80]}); {_REPLACE}") from None
        count(files[0], len(ranks), "tokens", _N_RANKS)
        numbered(files[0], ranks)
        return ranks
    vocab_bpe, encoder_json = files
    try:
        merges = vocab_bpe.read_text(encoding="utf-8").split("\n")[1:-1]
    except UnicodeDecodeError:
        raise _Damaged(f"{vocab_bpe.name} is not UTF-8 text; {_REPLACE}") from None
    try:
        encoder = json.loads(encoder_json.read_bytes())
    except ValueError as err:  # bad JSON or bad UTF-8
        raise _Damaged(f"{encoder_json.name} is not valid JSON ({err}); {_REPLACE}") from None
    bad = next((i for i, m in enumerate(merges, 2) if len(m.split()) != 2), None)
    if bad is not None:
        raise _Damaged(f"{vocab_bpe.name} line {bad} is not a merge of two tokens; {_REPLACE}")
    count(vocab_bpe, len(merges), "merges", _N_RANKS - 256)
    if not isinstance(encoder, dict):
        raise _Damaged(f"{encoder_json.name} is not an object of tokens and ids; {_REPLACE}")
    count(encoder_json, len(encoder), "tokens", _N_RANKS + 1)
    if encoder.get(_EOT) != _N_RANKS:
        raise _Damaged(f"{encoder_json.name} does not give {_EOT} the id {_N_RANKS}; {_REPLACE}")
    numbered(encoder_json, encoder)
    with _no_tiktoken_cache():
        try:
            return data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json))
        except (AssertionError, KeyError, ValueError):
            raise _Damaged(f"{vocab_bpe.name} and {encoder_json.name} do not agree (each is "
                           "well formed, but the merges give other ids than the encoder "
                           "holds); replace both with GPT-2's own") from None


def get_tokenizer(name: str = "byte", directory: str | os.PathLike | None = None) -> Tokenizer:
    """`"byte"` or `"gpt2"` (with an optional vocabulary directory)."""
    if name == "byte":
        return ByteTokenizer()
    if name == "gpt2":
        return GPT2Tokenizer(directory)
    raise ValueError(f"unknown tokenizer {name!r}; choose 'byte' or 'gpt2'")
