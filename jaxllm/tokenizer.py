"""Tokenizers behind one small interface: encode, decode, vocab_size, eot_id,
stop_ids, and the folder their files came from (`directory`).

- `ByteTokenizer`: the 256 byte values plus an end-of-text id; needs no files.
- `GPT2Tokenizer`: GPT-2's byte-level BPE through tiktoken, built from local
  vocabulary files (`gpt2.tiktoken`, `encoder.json` + `vocab.bpe`, or a Hugging
  Face folder's `vocab.json` + `merges.txt`).
- `HFTokenizer` (`jaxllm.hf_tokenizer`): a model family's own `tokenizer.json`
  through the `tokenizers` library, with its chat template and end-of-turn ids.

`get_tokenizer` is the one place every command finds a tokenizer's files: the
`--tokenizer-dir` flag, then the run's recorded folder or the Hugging Face
model folder, then `$JAXLLM_GPT2_DIR`, then a `shared/data` folder above the
checkout; when none holds them the message lists every place tried.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterable, Protocol, Sequence

GPT2_DIR_ENV = "JAXLLM_GPT2_DIR"
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_EOT = "<|endoftext|>"
NAMES = ("byte", "gpt2", "hf")
# The key of a Hugging Face config.json that names the tokenizer a jaxllm export
# was trained with (`jaxllm lora merge`), for a vocabulary its files cannot say.
EXPORT_KEY = "jaxllm_tokenizer"
# A Hugging Face folder's tokenizer files (GPT-2's, or any family's tokenizer.json).
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "generation_config.json", "chat_template.jinja")


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eot_id: int
    stop_ids: tuple[int, ...]  # the ids that end a generated answer (end of text, of turn)
    directory: str | None  # the folder its files were read from

    def encode(self, text: str, *, allow_eot: bool = False) -> list[int]: ...

    def encode_prompt(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, end-of-text as 256."""

    name = "byte"
    vocab_size = 257
    eot_id = 256
    stop_ids = (256,)
    directory = None

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

    def encode_prompt(self, text: str) -> list[int]:
        return _plain_prompt(self, text)


def _plain_prompt(tokenizer, text: str) -> list[int]:
    """A prompt as GPT-2 takes it: the text's ids, or end-of-text alone for none."""
    return tokenizer.encode(text) if text else [tokenizer.eot_id]


class GPT2Tokenizer:
    """GPT-2's 50,257-token byte-level BPE (tiktoken)."""

    name = "gpt2"
    vocab_size = 50257
    eot_id = 50256
    stop_ids = (50256,)

    def __init__(self, directory: str | os.PathLike | None = None):
        """The files in `directory`; without one, tiktoken's own download."""
        self._enc = _gpt2_encoding(directory)
        self.directory = None if directory is None else str(Path(directory).resolve())

    def encode_prompt(self, text: str) -> list[int]:
        return _plain_prompt(self, text)

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


def gpt2_files(directory: Path) -> list[Path] | None:
    """GPT-2's vocabulary files in `directory` (merges first, as `_load_ranks`
    reads them), or None: `gpt2.tiktoken`, `encoder.json` + `vocab.bpe`, or a
    Hugging Face folder's `vocab.json` + `merges.txt` (the same two files)."""
    if (directory / "gpt2.tiktoken").exists():
        return [directory / "gpt2.tiktoken"]
    for merges, vocab in (("vocab.bpe", "encoder.json"), ("merges.txt", "vocab.json")):
        if (directory / merges).exists() and (directory / vocab).exists():
            return [directory / merges, directory / vocab]
    return None


def _gpt2_encoding(directory):
    import tiktoken

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
    files = gpt2_files(d)
    if files is None:
        raise FileNotFoundError(f"{d / 'gpt2.tiktoken'} not found (nor encoder.json + "
                                f"vocab.bpe, nor vocab.json + merges.txt); {how}")
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


def shared_data_folders() -> list[Path]:
    """`shared/data` in every folder above the checkout jaxllm is imported from,
    then in and above the current directory (an install outside the checkout)."""
    cwd = Path.cwd().resolve()
    above = [*Path(__file__).resolve().parents[1:], cwd, *cwd.parents]
    return list(dict.fromkeys(parent / "shared" / "data" for parent in above))


def _hf_export_record(folder: Path) -> dict | None:
    """What a jaxllm export's config.json says of its tokenizer, if it does."""
    try:
        record = json.loads((folder / "config.json").read_text()).get(EXPORT_KEY)
    except (OSError, ValueError, AttributeError):
        return None
    return record if isinstance(record, dict) and record.get("name") in NAMES else None


def _name_from_folder(folder: Path, vocab_size: int | None) -> str:
    """The tokenizer a model folder holds: what a jaxllm export records; else
    its `tokenizer.json`, unless GPT-2's own vocabulary files stand beside it
    for a GPT-2-sized model without a chat template; else GPT-2's, or bytes
    for a byte-sized vocabulary without GPT-2's files."""
    record = _hf_export_record(folder)
    if record is not None:
        return record["name"]
    if (folder / "tokenizer.json").is_file():
        from jaxllm.hf_tokenizer import has_chat_template

        gpt2_like = vocab_size in (None, GPT2Tokenizer.vocab_size) and gpt2_files(folder)
        if not gpt2_like or has_chat_template(folder):
            return "hf"
    if vocab_size == ByteTokenizer.vocab_size and not gpt2_files(folder):
        return "byte"
    return "gpt2"


def get_tokenizer(name: str | None = "byte", directory: str | os.PathLike | None = None, *,
                  places: Sequence[tuple[str | os.PathLike | None, str]] = (),
                  vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer `name` ("byte", "gpt2" or "hf"; None: the one `directory`,
    else the first of `places`, holds for a model of `vocab_size` ids), its
    files found in this
    order: `directory` (the --tokenizer-dir flag: its files or an error), the
    `places` as (folder, how it was found) pairs (a run's recorded folder, a
    Hugging Face model folder), `$JAXLLM_GPT2_DIR`, a `shared/data` folder
    above the checkout, and for GPT-2 last tiktoken's download. The error
    names every place tried."""
    places = [(Path(p), how) for p, how in places if p]
    if name is None:  # the flag's folder, else the first place, says which
        first = Path(directory) if directory is not None else places[0][0] if places else None
        name = _name_from_folder(first, vocab_size) if first is not None else (
            "gpt2" if vocab_size in (None, GPT2Tokenizer.vocab_size) else "byte")
    if name not in NAMES:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of {', '.join(NAMES)}")
    if name == "byte":
        return ByteTokenizer()
    for folder, how in list(places):  # an export's recorded folder is one more place
        record = _hf_export_record(folder)
        if record and record.get("name") == name and record.get("directory"):
            places.append((Path(record["directory"]), f"recorded in {folder / 'config.json'}"))
    if name == "hf":
        from jaxllm.hf_tokenizer import HFTokenizer

        if directory is not None:
            return HFTokenizer(directory)
        for folder, _ in places:
            if (folder / "tokenizer.json").is_file():
                return HFTokenizer(folder)
        tried = "; ".join(f"{folder} ({how})" for folder, how in places) or "no folder given"
        raise FileNotFoundError(f"no tokenizer.json found: tried {tried}; pass the folder "
                                f"that holds it with --tokenizer-dir DIR")
    if directory is not None:
        return GPT2Tokenizer(directory)
    env = os.environ.get(GPT2_DIR_ENV)
    candidates = places + ([(Path(env), f"${GPT2_DIR_ENV}")] if env else [])
    candidates += [(d, "shared/data above the checkout") for d in shared_data_folders()]
    for folder, _ in candidates:
        if folder.is_dir() and gpt2_files(folder):
            return GPT2Tokenizer(folder)
    try:
        return GPT2Tokenizer(None)
    except FileNotFoundError as err:
        download = str(err).split(";")[0].removeprefix("GPT-2 vocabulary files not found and ")
        tried = "; ".join(f"{folder} ({how})" for folder, how in candidates)
        raise FileNotFoundError(
            f"GPT-2 vocabulary files (gpt2.tiktoken, encoder.json + vocab.bpe, or vocab.json + "
            f"merges.txt) not found: tried {tried}; and they {download}; pass the folder that "
            f"holds them with --tokenizer-dir DIR, or set ${GPT2_DIR_ENV}") from None


def check_vocab(vocab_size: int, tokenizer: Tokenizer) -> None:
    """Refuse a model whose vocabulary cannot hold the tokenizer's ids, or (for
    GPT-2 and bytes, whose vocabularies are never padded) has ids it lacks."""
    if vocab_size < tokenizer.vocab_size:  # its ids would index past the embedding
        raise ValueError(f"the model's vocabulary ({vocab_size} ids) cannot hold the "
                         f"{tokenizer.name} tokenizer's ids (0 to {tokenizer.vocab_size - 1}); "
                         f"give the --tokenizer the model was trained with")
    if vocab_size > tokenizer.vocab_size and tokenizer.name != "hf":
        raise ValueError(f"the model's vocabulary ({vocab_size}) is larger than the "
                         f"{tokenizer.name} tokenizer's ({tokenizer.vocab_size})")


def recorded_places(meta: dict, run_dir) -> list[tuple[str, str]]:
    """A run's recorded tokenizer folder as a `get_tokenizer` place."""
    d = meta.get("tokenizer_dir")
    return [(d, f"recorded by the run {run_dir}")] if d else []
