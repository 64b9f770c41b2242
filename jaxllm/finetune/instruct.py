"""Instruction fine-tuning: prompt formats, the loss, and batched responses.

An entry is `{"instruction", "input", "output"}`. A prompt *style* turns it
into a prompt (everything the model is given) and a response (what it should
write): the prompt ends where the response starts, so the same function
builds training text (prompt + response), the prompt-masking boundary and the
text a trained model is asked to continue.

- `alpaca`: "Below is an instruction ... ### Instruction:\\n{instruction}",
  "\\n\\n### Input:\\n{input}" when the input is not empty, then
  "\\n\\n### Response:\\n" and the output.
- `chat`: "<|user|>\\n{instruction}" (and "\\n\\n{input}"), then
  "\\n<|assistant|>\\n" and the output. The markers are plain text to the
  GPT-2 tokenizer (a few ordinary tokens each), so no new embedding rows are
  needed.
- `template`: the model's own chat template (a Hugging Face folder's
  tokenizer, `jaxllm.hf_tokenizer`): the instruction (and input) as a user
  turn with the generation prompt, then the output as the assistant turn's
  ids up to its end of turn; the run's end-of-text follows, as in the other
  styles. This one is made of ids, not text (`prompt_ids`, `answer_ids`).

Both prompts end in a newline, a pre-token boundary of GPT-2's BPE, so
encoding prompt and response apart and concatenating gives the tokens of
the whole text (tested on the shared data set) and the prompt length is
exact.

The loss is the engine's `lm_task`: next-token cross-entropy averaged over
the targets that are not -100, over the whole batch (and exactly so with
gradient accumulation), which is what `collate` prepares.
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import numpy as np

from jaxllm.train.task import lm_task

INSTRUCT_TASK = lm_task  # the masked next-token loss; padding and masked prompts are -100

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
PROMPT_STYLES = ("alpaca", "chat", "template")


def format_prompt(entry: Mapping[str, str], style: str = "alpaca") -> str:
    """The prompt of `entry` in `style`, up to where the response begins (the
    `template` style is the tokenizer's: see `prompt_ids`)."""
    instruction, extra = entry["instruction"], entry.get("input", "") or ""
    if style == "alpaca":
        text = f"{ALPACA_PREAMBLE}\n\n### Instruction:\n{instruction}"
        if extra:
            text += f"\n\n### Input:\n{extra}"
        return text + "\n\n### Response:\n"
    if style == "chat":
        text = f"<|user|>\n{instruction}"
        if extra:
            text += f"\n\n{extra}"
        return text + "\n<|assistant|>\n"
    if style == "template":
        raise ValueError("the template style is rendered by the tokenizer: use prompt_ids")
    raise ValueError(f"unknown prompt style {style!r}; choose from {', '.join(PROMPT_STYLES)}")


def _user_turn(entry: Mapping[str, str], tokenizer) -> list[dict[str, str]]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"the template prompt style needs a tokenizer with a chat template (a "
                         f"Hugging Face folder's); the {tokenizer.name} tokenizer has none")
    extra = entry.get("input", "") or ""
    return [{"role": "user", "content": entry["instruction"] + (f"\n\n{extra}" if extra else "")}]


def prompt_ids(entry: Mapping[str, str], style: str, tokenizer) -> list[int]:
    """The ids of `entry`'s prompt in `style`: what the model is given."""
    if style == "template":
        user = _user_turn(entry, tokenizer)
        return tokenizer.encode_chat(user, add_generation_prompt=True)
    return tokenizer.encode(format_prompt(entry, style))


def answer_ids(entry: Mapping[str, str], style: str, tokenizer, answer: str,
               prompt: list[int]) -> list[int]:
    """The ids of `answer` after `prompt` (`prompt_ids` of the entry): its text's
    ids, or in the template style the assistant turn's ids up to (not
    including) its end of turn, as the template renders the whole conversation."""
    if style != "template":
        return tokenizer.encode(answer)
    whole = tokenizer.encode_chat([*_user_turn(entry, tokenizer),
                                   {"role": "assistant", "content": answer}],
                                  add_generation_prompt=False)
    if whole[:len(prompt)] != prompt:
        raise ValueError("the chat template renders the user turn differently with an answer "
                         "after it than with the generation prompt, so the answer cannot be "
                         f"told from the prompt (entry {entry['instruction'][:40]!r}); use "
                         "--style alpaca or chat")
    rest = whole[len(prompt):]
    stops = set(getattr(tokenizer, "stop_ids", (tokenizer.eot_id,)))
    end = next((i for i, t in enumerate(rest) if t in stops), len(rest))
    return rest[:end]


def format_entry(entry: Mapping[str, str], style: str = "alpaca") -> tuple[str, str]:
    """(prompt, response): the training text is their concatenation."""
    return format_prompt(entry, style), entry["output"]


def clean_response(text: str) -> str:
    """A generated response as it is stored: surrounding whitespace removed, and
    anything after a new prompt section the model started (it did not stop at
    end-of-text) cut off."""
    for marker in ("\n### Instruction:", "\n### Input:", "\n### Response:", "<|user|>",
                   "<|assistant|>"):
        at = text.find(marker)
        if at >= 0:
            text = text[:at]
    return text.strip()


def generate_responses(params, config, tokenizer, entries: Sequence[Mapping[str, str]], *,
                       style: str = "alpaca", max_new_tokens: int = 256, batch_size: int = 8,
                       temperature: float = 0.0, rng=None) -> tuple[list[str], dict[str, Any]]:
    """A response for every entry, by KV-cached `generate` on batches of prompts.

    Greedy by default; each sequence stops at end-of-text. Prompts are sorted
    by length so that a batch pads little, and the last batch is filled up
    with copies so that every batch has the same shape (one compilation per
    prompt-length bucket). The prompt is not part of the returned text.
    Returns (responses in the order of `entries`, stats: entries, seconds,
    responses_per_s, new_tokens).
    """
    from jaxllm.generate import generate

    if not entries:
        return [], {"entries": 0, "seconds": 0.0, "responses_per_s": None, "new_tokens": 0}
    prompts = [prompt_ids(e, style, tokenizer) for e in entries]
    order = np.argsort([len(p) for p in prompts], kind="stable")
    stops = set(getattr(tokenizer, "stop_ids", (tokenizer.eot_id,)))
    batch_size = max(1, min(batch_size, len(prompts)))
    out: list[str | None] = [None] * len(prompts)
    new_tokens = 0
    start = time.perf_counter()
    for at in range(0, len(order), batch_size):
        idx = list(order[at:at + batch_size])
        rows = [prompts[i] for i in idx]
        rows += [rows[-1]] * (batch_size - len(rows))  # same shape as the others
        gen = generate(params, config, rows, max_new_tokens, eos_id=tokenizer.eot_id,
                       temperature=temperature, rng=rng)
        for k, i in enumerate(idx):
            n = int(gen.lengths[k])
            ids = gen.tokens[k, :n].tolist()
            stop = next((j for j, t in enumerate(ids) if t in stops), len(ids))
            ids = ids[:stop]  # an end of turn the tokenizer names stops it too
            new_tokens += len(ids)
            out[i] = clean_response(tokenizer.decode(ids))
    seconds = time.perf_counter() - start
    stats = {"entries": len(prompts), "seconds": seconds,
             "responses_per_s": len(prompts) / seconds if seconds > 0 else None,
             "new_tokens": new_tokens}
    return out, stats  # type: ignore[return-value]
