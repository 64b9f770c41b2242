"""Where training text comes from.

The default corpus ships with every CPython install and needs no download:
the English help pages of the `help()` system (`pydoc_data.topics.topics`,
about 80 documentation topics, roughly 0.45 MB of prose and examples; the
exact size follows the Python version). Any local UTF-8 text file, or folder
of `*.txt` files, can be used instead.

A corpus is a list of documents; `tokenize_documents` joins their token ids
with the tokenizer's end-of-text id between documents.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxllm.tokenizer import Tokenizer

DEFAULT_CORPUS_NAME = "pydoc-topics"


def default_corpus_documents() -> list[str]:
    """The CPython help topics, one document per topic, in sorted key order."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def read_text_file(path: str | os.PathLike, errors: str = "strict") -> str:
    """A file's text as UTF-8.

    Invalid UTF-8 raises a ValueError naming the file and the byte offset,
    unless `errors="replace"` (or another codec error handler) is asked for.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    data = path.read_bytes()
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not valid UTF-8: byte offset {err.start} "
                         f"(0x{data[err.start]:02x}): {err.reason}; use --errors replace (errors='replace' "
                         f"in Python) to substitute U+FFFD for bad bytes") from None


def read_documents(path: str | os.PathLike | None = None, errors: str = "strict") -> list[str]:
    """The documents of a corpus: `None` for the built-in corpus, a text file
    (one document), or a folder whose `*.txt` files (sorted by name) are the
    documents."""
    if path is None:
        return default_corpus_documents()
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"folder {path} holds no *.txt files")
        return [read_text_file(f, errors) for f in files]
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist (give a text file or a folder "
                                f"of *.txt files)")
    return [read_text_file(path, errors)]


def tokenize_documents(documents: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """Token ids of all documents, end-of-text between them, as one int32 array."""
    ids: list[int] = []
    for i, doc in enumerate(documents):
        if i:
            ids.append(tokenizer.eot_id)
        ids.extend(tokenizer.encode(doc))
    return np.asarray(ids, dtype=np.int32)
