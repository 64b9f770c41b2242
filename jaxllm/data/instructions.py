"""Instruction data: entries read from JSON or JSONL, split, tokenised, batched.

- `read_instructions(path)`: a JSON list of objects, or JSON Lines (one object
  a line, for `.jsonl` files); every entry needs string `instruction` and
  `output` (`input` may be absent: it reads as ""). Bad input is an error
  naming the file, the entry (or line) and what is wrong.
- `split_instructions(entries)`: in file order, the first 85 % trains, the
  next 10 % tests, the rest validates (1,100 entries: 935 / 110 / 55).
- `tokenize_entries(entries, tokenizer, style)`: each entry as an `Example`
  (prompt + response token ids, and the prompt's length).
- `collate(examples, ...)`: the batch rule as a pure function (below).
- `InstructionBatches`: the seeded, resumable batch order over the training
  examples (batch k of the run is a function of k and the seed), with optional
  length bucketing.

The collate rule. Each sequence gets one end-of-text token (50256) appended and
is padded with end-of-text to the longest sequence of the batch plus one;
inputs are the padded sequence without its last token, targets without its
first. In the targets, the first end-of-text of each row is kept (the model
learns to stop) and every padding position after it becomes -100 (ignored by
the loss). With `mask_prompt`, the targets that predict prompt tokens are
-100 too, so only the response (and its end-of-text) is trained. Rows are then
cut to `allowed_max_length`. `pad_multiple` optionally rounds the width up
(more -100 targets, end-of-text inputs): the loss and the outputs at the real
positions do not change (causal attention), and a jitted step compiles once
per width instead of once per batch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from jaxllm.finetune.instruct import answer_ids, prompt_ids

IGNORE_INDEX = -100
EOT_ID = 50256
REQUIRED_KEYS = ("instruction", "output")
OPTIONAL_KEYS = ("input",)
SPLIT = (0.85, 0.10)  # train, test; validation is the rest


class Example(NamedTuple):
    """One tokenised entry: prompt + response ids, and how many are prompt."""

    tokens: np.ndarray  # int32 (n,)
    prompt_length: int


# -- reading -------------------------------------------------------------------
def _check_entry(entry: Any, where: str, required: Sequence[str] = REQUIRED_KEYS,
                 optional: Sequence[str] = OPTIONAL_KEYS) -> dict[str, str]:
    """The entry's string fields; an optional one absent reads as ""."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where} is a JSON {type(entry).__name__}, not an object with "
                         + ", ".join(repr(k) for k in (*required, *optional)))
    missing = [k for k in required if k not in entry]
    if missing:
        raise ValueError(f"{where} has no {' or '.join(repr(k) for k in missing)} key "
                         f"(it has {sorted(entry)})")
    out = {}
    for key in (*required, *optional):
        value = entry.get(key, "")
        if not isinstance(value, str):
            raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
        out[key] = value
    return out


def read_instructions(path: str | os.PathLike, *, check=_check_entry,
                      what: str = "instruction data") -> list[dict[str, str]]:
    """The entries of a `.json` (a list) or `.jsonl` (one object a line) file,
    each passed through `check(entry, where)` (preference data has its own)."""
    path = Path(path)
    if path.is_dir():  # say so: "does not exist" would be wrong about a folder
        raise ValueError(f"{what} {path} is a folder, not a file; give the "
                         f".json or .jsonl file in it")
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    raw = path.read_bytes()
    if not raw.removeprefix(b"\xef\xbb\xbf").strip():  # JSON's "Expecting value" hides it
        raise ValueError(f"{what} {path} is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise ValueError(f"{path} is not valid UTF-8: byte {err.start} (line {line}) is "
                         f"{raw[err.start:err.start + 1]!r}") from None
    text = text.removeprefix("\ufeff")
    if path.suffix == ".jsonl":
        entries = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} line {number} is not JSON: {err.msg} "
                                 f"(column {err.colno})") from None
            entries.append(check(item, f"{path} line {number}"))
        if not entries:
            raise ValueError(f"{path} holds no entries")
        return entries
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not JSON: {err.msg} (line {err.lineno}, column "
                         f"{err.colno}); one object a line needs the .jsonl suffix") from None
    if not isinstance(data, list):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}; {what} must be "
                         f"a list of objects (or JSON Lines in a .jsonl file)")
    if not data:
        raise ValueError(f"{path} holds an empty list")
    return [check(item, f"{path} entry {i}") for i, item in enumerate(data)]


def entries_digest(entries: Sequence[dict[str, str]]) -> str:
    """sha256 of the entries in order: the data's identity, whatever the file's
    name or layout."""
    return hashlib.sha256(json.dumps(list(entries), sort_keys=True).encode()).hexdigest()


def split_instructions(entries: Sequence[Any], train: float = SPLIT[0], test: float = SPLIT[1]
                       ) -> tuple[list, list, list]:
    """(train, test, validation) in file order: the first `train` share of the
    count, the next `test` share, the rest. Counts are rounded down (to 9
    decimals first, so that 1,100 x 0.85 is 935 and not 934)."""
    if not (0 < train < 1 and 0 <= test < 1 and train + test < 1):
        raise ValueError(f"split shares train={train}, test={test} must be in (0, 1) with a "
                         f"remainder for validation")
    n = len(entries)
    n_train = math.floor(round(n * train, 9))
    n_test = math.floor(round(n * test, 9))
    return (list(entries[:n_train]), list(entries[n_train:n_train + n_test]),
            list(entries[n_train + n_test:]))


def tokenize_entries(entries: Sequence[dict[str, str]], tokenizer, style: str = "alpaca"
                     ) -> list[Example]:
    """Each entry as prompt ids followed by response ids (see `jaxllm.finetune.instruct`)."""
    out = []
    for entry in entries:
        p = prompt_ids(entry, style, tokenizer)
        r = answer_ids(entry, style, tokenizer, entry["output"], p)
        out.append(Example(np.asarray(p + r, np.int32), len(p)))
    return out


# -- the collate ---------------------------------------------------------------
def collate(examples: Sequence[Example], *, pad_id: int = EOT_ID,
            ignore_index: int = IGNORE_INDEX, allowed_max_length: int | None = 1024,
            mask_prompt: bool = False, pad_multiple: int = 1) -> dict[str, np.ndarray]:
    """{"tokens": inputs, "targets": targets}, int32 (batch, width), by the rule in
    the module docstring. Pure: the same examples give the same arrays."""
    if not examples:
        raise ValueError("collate needs at least one example")
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
    lengths = [len(e.tokens) for e in examples]
    width = max(lengths)  # = longest + 1 (the end-of-text), minus 1 (the shift)
    width = -(-width // pad_multiple) * pad_multiple
    inputs = np.full((len(examples), width), pad_id, np.int32)
    targets = np.full((len(examples), width), ignore_index, np.int32)
    for row, (e, n) in enumerate(zip(examples, lengths)):
        seq = np.asarray(e.tokens, np.int32)
        inputs[row, :n] = seq
        targets[row, :n - 1] = seq[1:]
        targets[row, n - 1] = pad_id  # the appended end-of-text: kept
        if mask_prompt:
            targets[row, :max(e.prompt_length - 1, 0)] = ignore_index
    if allowed_max_length is not None and width > allowed_max_length:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return {"tokens": inputs, "targets": targets}


# -- the batch order -----------------------------------------------------------
class InstructionBatches:
    """The training batches of a run, as a function of the batch number.

    Each epoch is a permutation of the examples drawn from (seed, epoch); the
    last incomplete batch is dropped. With `bucket`, the permuted examples
    are taken in windows of `bucket_window` batches, sorted by length within
    each window and cut into batches, and the batches of the epoch shuffled
    again: batches hold examples of similar length (little padding) while
    the epoch stays random. Batch k is `batch_at(k)`, so a resumed run sees
    the batches an uninterrupted one would.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, bucket: bool = False, bucket_window: int = 50,
                 collate_kwargs: dict[str, Any] | None = None):
        if len(examples) < batch_size:
            raise ValueError(f"{len(examples)} training examples are fewer than one batch of "
                             f"{batch_size}")
        self.examples = list(examples)
        self.batch_size = batch_size
        self.seed, self.shuffle, self.bucket, self.bucket_window = seed, shuffle, bucket, bucket_window
        self.collate_kwargs = dict(collate_kwargs or {})
        self.batches_per_epoch = len(self.examples) // batch_size
        self._epoch_cache: tuple[int, list[np.ndarray]] | None = None

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """The example indices of every batch of `epoch`."""
        if self._epoch_cache and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        n, b = len(self.examples), self.batch_size
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        order = order[:self.batches_per_epoch * b]
        if self.bucket:
            lengths = np.array([len(e.tokens) for e in self.examples])
            span = b * self.bucket_window
            order = np.concatenate([w[np.argsort(lengths[w], kind="stable")]
                                    for w in np.split(order, range(span, len(order), span))])
        batches = [order[i * b:(i + 1) * b] for i in range(self.batches_per_epoch)]
        if self.bucket and self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._epoch_cache = (epoch, batches)
        return batches

    def indices_at(self, k: int) -> np.ndarray:
        epoch, i = divmod(k, self.batches_per_epoch)
        return self.epoch_batches(epoch)[i]

    def batch_at(self, k: int) -> dict[str, np.ndarray]:
        return collate([self.examples[i] for i in self.indices_at(k)], **self.collate_kwargs)


def fixed_batches(examples: Sequence[Example], batch_size: int, count: int | None = None,
                  **collate_kwargs) -> list[dict[str, np.ndarray]]:
    """The first `count` (all when None) batches of `examples` in order, the last
    one possibly smaller: evaluation sets."""
    starts = range(0, len(examples), batch_size)
    if count is not None:
        starts = starts[:count]
    return [collate(examples[s:s + batch_size], **collate_kwargs) for s in starts]
