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

Every request has a total deadline (`timeout` seconds for connecting, sending
and the whole answer), so a server that trickles its reply one byte at a
time is cut off like one that says nothing. A judge that cannot be reached
(refused connection, unknown host) raises `JudgeUnavailable` at the first
entry, so a training run can say so and keep its other results; a slow,
broken or malformed answer (not HTTP, an HTTP error, not the protocol's
JSON) costs only that entry its score (its `error` says why, in one line),
and after `max_failures` such entries in a row the judge is given up as
unavailable.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import socket
import threading
import urllib.parse
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


def check_judge(url: str, timeout: float) -> None:
    """Refuse a malformed URL or a timeout that is not a positive number of
    seconds, before any request (and before the training a judge follows)."""
    endpoint(url)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
            or not (timeout > 0 and math.isfinite(timeout)):
        raise ValueError(f"the judge's timeout must be a positive number of seconds, "
                         f"got {timeout!r}")


def _post(full: str, body: bytes, timeout: float) -> tuple[int, str, bytes]:
    """(status, reason, body) of one POST, all of it within `timeout` seconds.

    A timer shuts the socket down at the deadline, which ends whatever read or
    write is waiting (a socket timeout alone bounds each read, not their sum).
    Raises `JudgeUnavailable` when no connection can be made, `TimeoutError`
    past the deadline, `ValueError` for a broken or non-HTTP answer."""
    parts = urllib.parse.urlsplit(full)
    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = kind(parts.hostname, parts.port, timeout=timeout)
    expired = threading.Event()

    def cut() -> None:
        expired.set()
        if conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    late = TimeoutError(f"the judge at {full} did not answer within {timeout:g} s")
    timer = threading.Timer(timeout, cut)
    timer.daemon = True
    timer.start()
    try:
        try:
            conn.connect()
        except TimeoutError:
            raise late from None
        except OSError as err:
            raise JudgeUnavailable(f"the judge at {full} cannot be reached: "
                                   f"{err.strerror or err}") from None
        if expired.is_set():
            raise late
        try:
            conn.request("POST", parts.path, body=body,
                         headers={"Content-Type": "application/json"})
            reply = conn.getresponse()
            return reply.status, reply.reason, reply.read()
        except (OSError, http.client.HTTPException) as err:
            if expired.is_set() or isinstance(err, TimeoutError):
                raise late from None
            if isinstance(err, http.client.BadStatusLine):
                raise ValueError(f"the judge at {full} answered something that is not HTTP: "
                                 f"{str(err)[:80]!r}") from None
            raise ValueError(f"the judge at {full} broke off its answer "
                             f"({type(err).__name__}: {str(err)[:80]})") from None
    finally:
        timer.cancel()
        conn.close()


def parse_score(text: str) -> int | None:
    """The first integer in `text` that lies in [0, 100], or None."""
    for match in re.finditer(r"(?<![\d.])\d+(?![\d.])", text):
        value = int(match.group())
        if 0 <= value <= 100:
            return value
    return None


def ask(url: str, model: str, prompt: str, *, timeout: float = 60.0) -> str:
    """The judge's answer to one user message (its text), within `timeout`
    seconds in all. Raises `JudgeUnavailable` when the server cannot be
    reached, `TimeoutError` when it is too slow, `ValueError` when the answer
    is not HTTP, an HTTP error, or not the protocol's JSON."""
    protocol, full = endpoint(url)
    messages = [{"role": "user", "content": prompt}]
    body = ({"model": model, "messages": messages, "stream": False,
             "options": {"temperature": 0, "seed": 123}} if protocol == "ollama" else
            {"model": model, "messages": messages, "temperature": 0})
    status, reason, raw = _post(full, json.dumps(body).encode(), timeout)
    if status >= 300:
        raise ValueError(f"the judge at {full} answered HTTP {status} {reason}")
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
    check_judge(url, timeout)  # a malformed URL or timeout fails before any request
    scores, failures_in_a_row = [], 0
    for entry in entries:
        shown = "alpaca" if style == "template" else style  # the judge reads text
        prompt = JUDGE_PROMPT.format(prompt=format_prompt(entry, shown).rstrip(),
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
