"""Labelled texts for classification: read, balance, split, tokenise, pad, batch.

Every step is a function of its inputs and a seed, so a run's rows and batches
are the same on every machine:

- `read_labeled(path)`: a headerless `label<TAB>text` file (the SMS Spam
  Collection's layout), or a file with a header row (any `.csv`, or any file
  once `label_column` / `text_column` name its columns: default "label" and
  "text"). In a tab-separated file `"` is text, so one stray quote cannot
  merge rows; in a `.csv` it quotes fields, and a quoted field that runs over
  a line break is warned of, naming its lines. `quotes=True` reads a
  tab-separated file as pandas does (the book's chapter-6 read of the SMS
  Spam Collection: 5,572 rows of its 5,574 lines). A UTF-8 byte-order mark is
  dropped.
- `balance(labels, seed)`: every class undersampled to the smallest one.
- `shuffle_split(n, (0.7, 0.1), seed)`: a seeded shuffle cut into train,
  validation and test (the rest).
- `encode_texts` and `pad_rows`: token ids cut to a maximum length and padded
  with `<|endoftext|>` (50256) on the right, with the real lengths kept.
- `ClassificationBatches`: the seeded, resumable training order (batch k is a
  function of k and the seed; drop_last), and `fixed_batches` for evaluation
  (every row once, the last batch filled with rows of weight 0).

The seeded draws are NumPy's legacy `RandomState` permutations, the draws
pandas' `DataFrame.sample(random_state=seed)` makes, so `seed=123` picks the
very rows of the book's chapter-6 protocol (`prepare_classification`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

PAD_ID = 50256  # GPT-2's <|endoftext|>
DEFAULT_SPLIT = (0.7, 0.1)  # train, validation; test is the rest


class LabeledTextError(ValueError):
    """A labelled-text file that cannot be read as one: the message names the
    file, the line and what is wrong."""


def read_labeled(path: str | os.PathLike, *, label_column: str | None = None,
                 text_column: str | None = None, delimiter: str | None = None,
                 quotes: bool | None = None) -> tuple[list[str], list[str]]:
    """(texts, labels) of a labelled-text file, in file order.

    Headerless `label<TAB>text` unless the file ends in `.csv` or a column is
    named; then the first row is a header and the columns are found by name
    (`label_column` default "label", `text_column` default "text"). The
    delimiter defaults to "," for `.csv` and a tab otherwise. `quotes`
    (default: on unless tab-separated) makes `"` a quote character; a quoted
    field that spans lines is then warned of, with its first line.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise LabeledTextError(f"{path} is a folder; give a .tsv or .csv file")
    is_csv = path.suffix.lower() == ".csv"
    header = is_csv or label_column is not None or text_column is not None
    delimiter = delimiter or ("," if is_csv else "\t")
    if quotes is None:
        quotes = delimiter != "\t"
    spanning = []  # (first line, last line) of rows whose quoted field holds a line break
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM is dropped
            reader = csv.reader(f, delimiter=delimiter,
                                quoting=csv.QUOTE_MINIMAL if quotes else csv.QUOTE_NONE)
            rows, last = [], 0
            for row in reader:
                rows.append((reader.line_num, row))  # the line each row ends on
                if reader.line_num > last + 1 and row:
                    spanning.append((last + 1, reader.line_num))
                last = reader.line_num
    except UnicodeDecodeError as err:
        raise LabeledTextError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") \
            from None
    except csv.Error as err:
        raise LabeledTextError(f"{path}: {err}") from None
    if spanning:
        (first, end), more = spanning[0], len(spanning) - 1
        warnings.warn(f"{path}, line {first}: a quoted field runs on to line {end}, making "
                      f"{end - first + 1} lines one row" + (f" ({more} more such row(s))"
                                                            if more else "")
                      + "; a stray \" merges rows (check the quotes there)", stacklevel=2)
    rows = [(n, r) for n, r in rows if r and any(c.strip() for c in r)]  # blank lines skipped
    if not rows:
        raise LabeledTextError(f"{path} is empty: no labelled rows")
    if header:
        names = [c.strip() for c in rows[0][1]]
        want = {"label": label_column or "label", "text": text_column or "text"}
        cols = {}
        for role, name in want.items():
            if name not in names:
                raise LabeledTextError(f"{path}: no {role} column {name!r} in the header "
                                       f"{names} (--{role}-column names it)")
            cols[role] = names.index(name)
        li, ti, width = cols["label"], cols["text"], len(names)
        rows = rows[1:]
        if not rows:
            raise LabeledTextError(f"{path} has a header but no rows")
    else:
        li, ti, width = 0, 1, 2
    texts, labels = [], []
    for line, row in rows:
        if len(row) != width:
            what = ("label<TAB>text (2 fields)" if not header else f"{width} fields as the header")
            raise LabeledTextError(f"{path}, line {line}: {len(row)} field(s) where {what} "
                                   f"were expected: {delimiter.join(row)[:80]!r}")
        label, text = row[li].strip(), row[ti]
        if not label:
            raise LabeledTextError(f"{path}, line {line}: empty label")
        texts.append(text)
        labels.append(label)
    return texts, labels


def rows_digest(texts: Sequence[str], labels: Sequence[str]) -> str:
    """sha256 of the (label, text) rows in order: the data's identity, whatever
    the file's name or layout."""
    return hashlib.sha256(json.dumps([list(labels), list(texts)]).encode()).hexdigest()


RARE_CLASS_ROWS = 10  # fewer rows than this in a class get a warning


def class_ids(labels: Sequence[str], classes: Sequence[str] | None = None
              ) -> tuple[np.ndarray, list[str]]:
    """(ids, classes): labels as ints in `classes` order (default: sorted, so
    ham=0, spam=1). A label outside `classes`, or fewer than 2 classes, is an error."""
    given = classes is not None
    classes = list(sorted(set(labels)) if classes is None else classes)
    if len(set(classes)) != len(classes):
        raise ValueError(f"classes repeat: {classes}")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        first = next(i for i, x in enumerate(labels) if x not in index)
        raise ValueError(f"label(s) {unknown[:5]} are not among the classes {classes} (the "
                         f"first on data row {first + 1}: {labels[first]!r})")
    if len(classes) < 2:
        raise ValueError(f"a classifier needs at least 2 classes; "
                         f"{'they are' if given else 'the data has'} {len(classes)}: {classes}")
    absent = [c for c in classes if c not in set(labels)]
    if absent:
        raise ValueError(f"class(es) {absent} have no rows in the data (misspelled in the "
                         f"classes given?); the data's labels are {sorted(set(labels))}")
    return np.array([index[x] for x in labels], np.int32), classes


def balance(labels: np.ndarray, seed: int) -> np.ndarray:
    """Row indices with every class undersampled to the smallest class's count:
    class by class in id order, each larger class's rows drawn by a fresh
    `RandomState(seed)` permutation (pandas' `sample(n, random_state=seed)`)."""
    labels = np.asarray(labels)
    counts = np.bincount(labels)
    n = counts[counts > 0].min()
    out = []
    for c in range(len(counts)):
        rows = np.flatnonzero(labels == c)
        if len(rows) > n:
            rows = rows[np.random.RandomState(seed).permutation(len(rows))[:n]]
        out.append(rows)
    return np.concatenate(out)


def shuffle_split(n: int, fractions: tuple[float, float] = DEFAULT_SPLIT, seed: int = 123
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, validation, test) positions of a seeded shuffle of range(n):
    `int(n * f)` rows for each of the first two fractions, the rest for test."""
    train_f, val_f = fractions
    if not (0 < train_f and 0 <= val_f and train_f + val_f < 1):
        raise ValueError(f"split fractions must be train > 0, validation >= 0 and sum < 1, "
                         f"got {fractions}")
    order = np.random.RandomState(seed).permutation(n)
    a = int(n * train_f)
    b = a + int(n * val_f)
    return order[:a], order[a:b], order[b:]


def encode_texts(texts: Sequence[str], tokenizer) -> list[list[int]]:
    """Token ids of each text (ordinary text: a literal "<|endoftext|>" is text)."""
    return [tokenizer.encode(t) for t in texts]


def pad_rows(ids: Sequence[Sequence[int]], length: int, pad_id: int = PAD_ID
             ) -> tuple[np.ndarray, np.ndarray, int]:
    """(tokens (n, length) int32, lengths (n,), rows truncated): each row cut to
    `length` and padded on the right with `pad_id`. An empty text keeps one
    pad token so that it has a last token to read."""
    tokens = np.full((len(ids), length), pad_id, np.int32)
    lengths = np.empty(len(ids), np.int32)
    cut = 0
    for i, row in enumerate(ids):
        row = list(row)[:length]
        cut += len(row) < len(ids[i])
        tokens[i, :len(row)] = row
        lengths[i] = max(len(row), 1)
    return tokens, lengths, cut


@dataclasses.dataclass
class Split:
    """One split: padded tokens, real lengths, class ids and the texts."""

    tokens: np.ndarray  # (n, max_length) int32
    lengths: np.ndarray  # (n,) int32, >= 1
    labels: np.ndarray  # (n,) int32
    texts: list[str]

    def __len__(self) -> int:
        return len(self.labels)


@dataclasses.dataclass
class ClassificationData:
    """A data set ready to train on, with what was done to it."""

    train: Split
    validation: Split
    test: Split
    classes: list[str]
    max_length: int  # every row's width
    info: dict[str, Any]  # counts: rows read, per class, balanced, truncated

    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "validation": self.validation, "test": self.test}


def prepare_classification(path: str | os.PathLike, tokenizer, *, context_length: int,
                           seed: int = 123, balanced: bool = True,
                           fractions: tuple[float, float] = DEFAULT_SPLIT,
                           max_length: int | None = None, classes: Sequence[str] | None = None,
                           label_column: str | None = None, text_column: str | None = None,
                           pad_id: int | None = None, quotes: bool | None = None
                           ) -> ClassificationData:
    """Read, balance (seeded), shuffle and split (seeded), tokenise and pad.

    Rows are padded to `max_length`, by default the longest training text's
    token count, and never wider than `context_length`; longer texts (in any
    split) are truncated, and a warning says how many. `pad_id` defaults to the
    tokenizer's end-of-text id (50256 for GPT-2). `quotes` as in `read_labeled`.
    `info["sha256"]` is a digest of the rows read (labels and texts), so that a
    resumed run can tell another data file from its own.
    """
    if pad_id is None:
        pad_id = getattr(tokenizer, "eot_id", PAD_ID)
    texts, labels = read_labeled(path, label_column=label_column, text_column=text_column,
                                 quotes=quotes)
    try:
        y, classes = class_ids(labels, classes)
    except ValueError as err:
        raise LabeledTextError(f"{path}: {err}") from None
    counts = np.bincount(y, minlength=len(classes))
    for i, c in enumerate(classes):  # class_ids refused a class with no rows
        if counts[i] < RARE_CLASS_ROWS:  # one mistyped label makes a class of its own
            warnings.warn(f"{path}: class {c!r} has only {counts[i]} row(s) (the first is data "
                          f"row {int(np.argmax(y == i)) + 1}); a mistyped label? --classes "
                          "names the valid labels and refuses any other", stacklevel=2)
    info: dict[str, Any] = {"rows": len(texts),
                            "per_class": {c: int((y == i).sum()) for i, c in enumerate(classes)},
                            "pad_id": pad_id, "sha256": rows_digest(texts, labels)}
    rows = balance(y, seed) if balanced else np.arange(len(y))
    info["balanced"] = int(len(rows)) if balanced else None
    info["seed"] = seed  # which rows are in which split: a resumed run must keep it
    parts = shuffle_split(len(rows), fractions, seed)
    if len(parts[0]) == 0 or len(parts[2]) == 0:
        raise ValueError(f"{path}: {len(rows)} rows leave an empty train or test split; "
                         f"give more rows")
    chosen = [rows[p] for p in parts]
    ids = [encode_texts([texts[i] for i in idx], tokenizer) for idx in chosen]
    longest = max(len(r) for r in ids[0])
    if max_length is None:
        max_length = longest
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if max_length > context_length:
        max_length = context_length
    out, cut_total = [], {}
    for name, idx, rows_ids in zip(("train", "validation", "test"), chosen, ids):
        tokens, lengths, cut = pad_rows(rows_ids, max_length, pad_id)
        cut_total[name] = cut
        out.append(Split(tokens, lengths, y[idx], [texts[i] for i in idx]))
    info.update(train=len(out[0]), validation=len(out[1]), test=len(out[2]),
                longest_train=longest, max_length=max_length, truncated=cut_total)
    if sum(cut_total.values()):
        warnings.warn(f"{path}: {sum(cut_total.values())} text(s) longer than {max_length} tokens "
                      f"were truncated ({', '.join(f'{k} {v}' for k, v in cut_total.items())})",
                      stacklevel=2)
    return ClassificationData(*out, classes=classes, max_length=max_length, info=info)


def _batch(split: Split, idx: np.ndarray, weight: np.ndarray | None = None) -> dict[str, Any]:
    return {"tokens": split.tokens[idx], "lengths": split.lengths[idx],
            "labels": split.labels[idx],
            "weight": np.ones(len(idx), np.float32) if weight is None else weight}


class ClassificationBatches:
    """The training order: each epoch a seeded permutation of the rows, cut
    into full batches (drop_last). `batch_at(k)` depends only on k and the
    seed, so a resumed run reads the batches an uninterrupted one would."""

    def __init__(self, split: Split, batch_size: int, *, seed: int = 0, shuffle: bool = True):
        if len(split) < batch_size:
            raise ValueError(f"the training split has {len(split)} rows, fewer than one batch "
                             f"of {batch_size}")
        self.split, self.batch_size, self.seed, self.shuffle = split, batch_size, seed, shuffle
        self.batches_per_epoch = len(split) // batch_size
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        if self._order is None or self._order[0] != epoch:
            n = len(self.split)
            perm = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                    else np.arange(n))
            self._order = (epoch, perm)
        return self._order[1]

    def batch_at(self, k: int) -> dict[str, Any]:
        epoch, i = divmod(k, self.batches_per_epoch)
        idx = self.order(epoch)[i * self.batch_size:(i + 1) * self.batch_size]
        return _batch(self.split, idx)


def fixed_batches(split: Split, batch_size: int, count: int | None = None
                  ) -> list[dict[str, Any]]:
    """The split in order, in batches of `batch_size` (the first `count`, or all):
    the last batch is filled up with copies of row 0 at weight 0, so that every
    batch has one shape and the sums count each row once."""
    n = len(split)
    batches = []
    for start in range(0, n, batch_size):
        if count is not None and len(batches) >= count:
            break
        idx = np.arange(start, min(start + batch_size, n))
        weight = np.ones(batch_size, np.float32)
        if len(idx) < batch_size:
            weight[len(idx):] = 0.0
            idx = np.concatenate([idx, np.zeros(batch_size - len(idx), idx.dtype)])
        batches.append(_batch(split, idx, weight))
    return batches
