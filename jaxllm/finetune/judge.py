"""Scoring responses with a judge model behind an HTTP chat endpoint.

Each response is shown to the judge with the entry's prompt and reference
output, and the judge is asked for an integer from 0 to 100; the first
integer of its answer in that range is the score. Two protocols are spoken,
chosen by the URL's path:

- Ollama's `/api/chat` (`http://localhost:11434`, or any URL whose path is
  not an OpenAI one): `{"model", "messages", "stream": false}` in,
  `{"message": {"content"}}` out;
- OpenAI-compatible `/v1/chat/completions` (a path containing `/v1`):
  `{"model", "messages", "temperature": 0}` in, `{"choices": [{"message":
  {"content"}}]}` out.

A judge that cannot be reached (refused connection, unknown host) raises
`JudgeUnavailable` at the first entry, so a training run can say so and keep
its other results; a slow or malformed answer costs only that entry its
score (its `error` says why), and after `max_failures` such entries in a row
the judge is given up as unavailable.
"""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Mapping, Sequence

from jaxllm.finetune.instruct import format_prompt

JUDGE_PROMPT = ("Given the input `{prompt}` and the correct output `{output}`, score the model "
                "response `{response}` on a scale from 0 to 100, where 100 is the best score. "
                "Respond with the integer number only.")


class JudgeUnavailable(RuntimeError):
    """The judge endpoint cannot be reached (or keeps failing)."""


def endpoint(url: str) -> tuple[str, str]:
    """(protocol, full URL): "openai" for a path with /v1 (completed with
    /chat/completions), else "ollama" (an empty path becomes /api/chat)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"judge URL {url!r} must be http(s)://host[:port][/path]")
    path = parts.path.rstrip("/")
    if "/v1" in path:
        if not path.endswith("/chat/completions"):
            path += "/chat/completions"
        protocol = "openai"
    else:
        protocol, path = "ollama", path or "/api/chat"
    return protocol, urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def parse_score(text: str) -> int | None:
    """The first integer in `text` that lies in [0, 100], or None."""
    for match in re.finditer(r"(?<![\d.])\d+(?![\d.])", text):
        value = int(match.group())
        if 0 <= value <= 100:
            return value
    return None


def ask(url: str, model: str, prompt: str, *, timeout: float = 60.0) -> str:
    """The judge's answer to one user message (its text). Raises
    `JudgeUnavailable` when the server cannot be reached, `TimeoutError` when
    it is too slow, `ValueError` when the answer is not the protocol's JSON."""
    protocol, full = endpoint(url)
    messages = [{"role": "user", "content": prompt}]
    body = ({"model": model, "messages": messages, "stream": False,
             "options": {"temperature": 0, "seed": 123}} if protocol == "ollama" else
            {"model": model, "messages": messages, "temperature": 0})
    request = urllib.request.Request(full, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            raw = reply.read()
    except (socket.timeout, TimeoutError):
        raise TimeoutError(f"the judge at {full} did not answer within {timeout:g} s") from None
    except urllib.error.HTTPError as err:
        raise ValueError(f"the judge at {full} answered HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        if isinstance(err.reason, (socket.timeout, TimeoutError)):
            raise TimeoutError(f"the judge at {full} did not answer within {timeout:g} s") \
                from None
        raise JudgeUnavailable(f"the judge at {full} cannot be reached: {err.reason}") from None
    except ConnectionError as err:
        raise JudgeUnavailable(f"the judge at {full} cannot be reached: {err}") from None
    try:
        data = json.loads(raw)
        content = (data["message"]["content"] if protocol == "ollama"
                   else data["choices"][0]["message"]["content"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise ValueError(f"the judge at {full} answered something that is not {protocol} chat "
                         f"JSON: {raw[:120]!r}") from None
    if not isinstance(content, str):
        raise ValueError(f"the judge at {full} answered a non-text message: {content!r}")
    return content


def judge_responses(entries: Sequence[Mapping[str, Any]], url: str, model: str, *,
                    style: str = "alpaca", timeout: float = 60.0, max_failures: int = 3,
                    response_key: str = "model_response") -> dict[str, Any]:
    """Score every entry's response; returns {"scores": [{"score", "error"}...],
    "mean" (over the scored entries, None if none), "scored", "failed",
    "model", "url"}. Raises `JudgeUnavailable` as the module docstring says."""
    endpoint(url)  # a malformed URL fails before any request
    scores, failures_in_a_row = [], 0
    for entry in entries:
        prompt = JUDGE_PROMPT.format(prompt=format_prompt(entry, style).rstrip(),
                                     output=entry["output"], response=entry[response_key])
        try:
            answer = ask(url, model, prompt, timeout=timeout)
            score = parse_score(answer)
            error = None if score is not None else f"no score in the answer {answer[:80]!r}"
        except (TimeoutError, ValueError) as err:
            score, error = None, str(err)
        scores.append({"score": score, "error": error})
        failures_in_a_row = failures_in_a_row + 1 if score is None else 0
        if failures_in_a_row >= max_failures and len(scores) < len(entries):
            raise JudgeUnavailable(f"the judge failed {failures_in_a_row} entries in a row "
                                   f"(last: {error}); stopped asking")
    scored = [s["score"] for s in scores if s["score"] is not None]
    return {"scores": scores, "mean": sum(scored) / len(scored) if scored else None,
            "scored": len(scored), "failed": len(scores) - len(scored), "model": model,
            "url": url}
