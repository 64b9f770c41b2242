"""Preference data: pairs of a preferred and a rejected answer, read, split, tokenised, batched.

- `read_preferences(path)`: a JSON list of objects, or JSON Lines (`.jsonl`);
  every entry needs string `instruction`, `chosen` and `rejected` (`input`
  may be absent: it reads as ""; `output`, when there, must be a string and
  is kept). Bad input is an error naming the file, the entry (or line) and
  what is wrong (the instruction data's reader, `jaxllm.data.instructions`).
- The split is the instruction data's: in file order 85 / 10 / rest
  (`split_instructions`; 1,100 entries give 935 / 110 / 55).
- `tokenize_pairs(entries, tokenizer, style)`: each entry as a `Pair`: the
  chosen and the rejected sequence (prompt + answer ids) and how many leading
  tokens of each are not scored. The prompt is the instruction data's
  (`jaxllm.finetune.instruct.prompt_ids`: Alpaca, chat or the model's chat template).
- `collate(pairs, ...)`: the batch rule as a pure function (below).
- `PreferenceBatches`: the seeded, resumable batch order, with each pair's
  cached reference log-probabilities beside its tokens.

The collate rule. Every chosen and rejected sequence of the batch is padded
with end-of-text to one common width, the longest sequence plus one; each
gets a mask, 1 on the answer's tokens and 0 on the unscored prefix and the
padding; rows are then cut to `allowed_max_length`. The masks mark tokens,
not targets: a sequence's log-probability sums the log-probability of every
masked-in token given the tokens before it.

- `book=False` (the default): each answer ends in one end-of-text token,
  which is scored (the preference covers where to stop); the unscored prefix
  is exactly the prompt ("...### Response:\\n"); `pad_multiple` rounds the
  width up (a jitted step compiles once per width; masked padding changes
  nothing).
- `book=True`: the notebook of the book's chapter 7 bonus material, exactly:
  the sequence is the tokens of `instruction part + "\\n\\n### Response:\\n" +
  answer` with no end-of-text, and the unscored prefix is the instruction
  part's tokens plus 2 (the 2 newline tokens GPT-2's BPE makes of "\\n\\n"
  before "###").
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

from jaxllm.data.instructions import (EOT_ID, InstructionBatches, _check_entry,
                                      read_instructions, split_instructions)
from jaxllm.finetune.instruct import answer_ids, format_prompt, prompt_ids

PAIR_KEYS = ("instruction", "chosen", "rejected")
RESPONSE_HEADER = "\n\n### Response:\n"  # where the book's Alpaca prompt ends
BOOK_OFFSET = 2  # the notebook's mask leaves out 2 tokens after the instruction part

split_preferences = split_instructions  # the same 85 / 10 / rest split in file order


class Pair(NamedTuple):
    """One tokenised preference entry: both sequences and their unscored prefix."""

    chosen: np.ndarray  # int32 (n,): prompt + chosen answer
    rejected: np.ndarray  # int32 (m,): prompt + rejected answer
    prefix: int  # leading tokens of each that are not scored


# -- reading -------------------------------------------------------------------
def _check_pair(entry: Any, where: str) -> dict[str, str]:
    out = _check_entry(entry, where, required=PAIR_KEYS, optional=("input",))
    if "output" in entry:
        if not isinstance(entry["output"], str):
            raise ValueError(f"{where}: 'output' must be a string, got "
                             f"{type(entry['output']).__name__}")
        out["output"] = entry["output"]
    return out


def read_preferences(path) -> list[dict[str, str]]:
    """The entries of a `.json` (a list) or `.jsonl` (one object a line) preference file."""
    return read_instructions(path, check=_check_pair, what="preference data")


# -- tokens --------------------------------------------------------------------
def tokenize_pairs(entries: Sequence[dict[str, str]], tokenizer, style: str = "alpaca", *,
                   book: bool = False, eot_id: int | None = None) -> list[Pair]:
    """Each entry as a `Pair` by the module's rule (`book` as in `collate`)."""
    eot = tokenizer.eot_id if eot_id is None else eot_id
    out = []
    for entry in entries:
        if book:
            prompt = format_prompt(entry, style)
            if style != "alpaca":
                raise ValueError("the book's preference collate is defined on Alpaca prompts; "
                                 f"got style {style!r}")
            head = tokenizer.encode(prompt.removesuffix(RESPONSE_HEADER))
            seqs = [tokenizer.encode(prompt + entry[k]) for k in ("chosen", "rejected")]
            prefix = len(head) + BOOK_OFFSET
        else:
            p = prompt_ids(entry, style, tokenizer)
            seqs = [p + answer_ids(entry, style, tokenizer, entry[k], p) + [eot]
                    for k in ("chosen", "rejected")]
            prefix = len(p)
        out.append(Pair(*(np.asarray(s, np.int32) for s in seqs), prefix))
    return out


# -- the collate ---------------------------------------------------------------
def collate(pairs: Sequence[Pair], *, pad_id: int = EOT_ID,
            allowed_max_length: int | None = None, pad_multiple: int = 1) -> dict[str, np.ndarray]:
    """{"chosen", "rejected"}: int32 (batch, width), and {"chosen_mask",
    "rejected_mask"}: bool (batch, width), by the rule in the module docstring
    (which of its two forms is decided when the pairs are tokenised). Pure."""
    if not pairs:
        raise ValueError("collate needs at least one pair")
    if pad_multiple < 1:
        raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}")
    width = max(max(len(p.chosen), len(p.rejected)) for p in pairs) + 1
    width = -(-width // pad_multiple) * pad_multiple
    out = {}
    for key in ("chosen", "rejected"):
        tokens = np.full((len(pairs), width), pad_id, np.int32)
        mask = np.zeros((len(pairs), width), bool)
        for row, pair in enumerate(pairs):
            seq = getattr(pair, key)
            tokens[row, :len(seq)] = seq
            mask[row, pair.prefix:len(seq)] = True
        if allowed_max_length is not None:
            tokens, mask = tokens[:, :allowed_max_length], mask[:, :allowed_max_length]
        out[key], out[f"{key}_mask"] = tokens, mask
    return out


# -- the batch order -----------------------------------------------------------
class PreferenceBatches(InstructionBatches):
    """The training batches of a run, as a function of the batch number: the
    instruction batches' seeded order (a permutation per epoch, the last
    incomplete batch dropped), collated by `collate`, with the pairs' cached
    reference log-probabilities (`reference`: {"ref_chosen": (n,), "ref_rejected":
    (n,)}, one value per pair) as further batch keys."""

    def __init__(self, pairs: Sequence[Pair], batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, collate_kwargs: dict[str, Any] | None = None,
                 reference: dict[str, np.ndarray] | None = None):
        super().__init__(pairs, batch_size, seed=seed, shuffle=shuffle,
                         collate_kwargs=collate_kwargs)
        self.reference = reference

    def batch_at(self, k: int) -> dict[str, np.ndarray]:
        idx = self.indices_at(k)
        batch = collate([self.examples[i] for i in idx], **self.collate_kwargs)
        for key, values in (self.reference or {}).items():
            batch[key] = np.asarray(values)[idx]
        return batch


def fixed_pair_batches(pairs: Sequence[Pair], batch_size: int, count: int | None = None, *,
                       reference: dict[str, np.ndarray] | None = None,
                       **collate_kwargs) -> list[dict[str, np.ndarray]]:
    """The first `count` (all when None) batches of `pairs` in order, the last one
    possibly smaller (evaluation sets), with the pairs' `reference` values
    (one per pair, as in `PreferenceBatches`) beside them."""
    starts = range(0, len(pairs), batch_size)
    if count is not None:
        starts = starts[:count]
    out = []
    for s in starts:
        batch = collate(pairs[s:s + batch_size], **collate_kwargs)
        for key, values in (reference or {}).items():
            batch[key] = np.asarray(values)[s:s + batch_size]
        out.append(batch)
    return out
