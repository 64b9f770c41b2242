"""Text in, token batches out.

- `corpus`: the built-in corpus (CPython's own help text) and local text files.
- `windows`: the sliding-window dataset, the train/validation split and the
  seeded, resumable batch order.
- `token_file`: a one-time tokenisation into a binary file, read back through
  `np.memmap`, with seeded random windows for corpora larger than memory.
"""

from jaxllm.data.corpus import (
    DEFAULT_CORPUS_NAME,
    default_corpus_documents,
    read_documents,
    read_text_file,
    tokenize_documents,
)
from jaxllm.data.token_file import RandomWindowBatches, TokenFile, write_token_file
from jaxllm.data.windows import SlidingWindows, WindowBatches, split_tokens

__all__ = [
    "DEFAULT_CORPUS_NAME", "default_corpus_documents", "read_documents", "read_text_file",
    "tokenize_documents", "RandomWindowBatches", "TokenFile", "write_token_file",
    "SlidingWindows", "WindowBatches", "split_tokens",
]
