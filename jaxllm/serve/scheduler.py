"""Continuous batching: requests waiting, requests decoding in the engine's
slots, and finished ones leaving, as a plain Python loop.

Each `step()` admits waiting requests, in order, into the lowest free slots,
as many as one prefill holds (`SlotEngine.prefill_fits`: a padded batch of
at most a context's worth of tokens, so new prompts hold the others back by
one prefill's work at most), then runs one decode step over the occupied
slots and hands each running request its token. A request that ends (an end-of-text or end-of-turn id, a `stop`
string, `max_tokens`, or `cancel`) frees its slot at once, and the next
waiting request takes it at the following step. The loop knows nothing of
HTTP; `jaxllm.serve.app` runs it on a thread (`run`) and the tests call
`step()` directly.
"""

from __future__ import annotations

import codecs
import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

_ids = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation: the prompt's ids and how to continue it.

    What it produced is filled in as it runs: `tokens` (the ids drawn,
    without a final stop id), `text` (their text, cut before a stop string),
    `finish_reason` ("stop", "length", "cancelled", or "error" when the model
    failed) once done.
    `listener(delta, finish_reason)` is called from the scheduler's thread
    with each new piece of text (held back while it might still become a stop
    string) and once more at the end with the finish reason.
    """

    prompt: Sequence[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: Sequence[str] = ()
    listener: Callable[[str, str | None], None] | None = None
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    drawn: int = 0  # tokens drawn, counting a final stop id (the usage count)
    sent: int = 0  # characters of `text` given to the listener
    cancelled: bool = False
    submitted: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)


class Scheduler:
    """Requests over a `SlotEngine`'s slots.

    `token_bytes(id) -> bytes` turns a token into text (for stop strings and
    the listeners); `stop_ids` end a request without being part of its text.
    """

    def __init__(self, engine, token_bytes: Callable[[int], bytes], stop_ids: Sequence[int]):
        self.engine = engine
        self.token_bytes = token_bytes
        self.stop_ids = frozenset(int(i) for i in stop_ids)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request | None] = [None] * engine.slots
        self.lock = threading.Condition()
        self.steps = 0  # decode steps run (for tests and measurements)
        self.finished = collections.Counter()  # requests ended, by finish reason
        self._closed = False
        self.error: str | None = None  # why the last failed step failed

    # -- called from any thread ------------------------------------------------
    def submit(self, request: Request) -> Request:
        """Queue `request`; it joins the batch at a coming step."""
        context = self.engine.config.context_length
        if not 1 <= len(request.prompt) <= context:
            raise ValueError(f"the prompt has {len(request.prompt)} tokens; it must have 1 "
                             f"to {context} (the context length)")
        if request.max_tokens < 1 or len(request.prompt) + request.max_tokens > context:
            raise ValueError(f"max_tokens {request.max_tokens} with a prompt of "
                             f"{len(request.prompt)} tokens: they must fit the context length "
                             f"{context} (max_tokens from 1 to "
                             f"{context - len(request.prompt)})")
        with self.lock:
            self.waiting.append(request)
            self.lock.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stop `request` (a client gone): its slot is freed at the next step."""
        with self.lock:
            request.cancelled = True
            self.lock.notify()

    def close(self) -> None:
        with self.lock:
            self._closed = True
            self.lock.notify()

    @property
    def busy(self) -> int:
        """Slots in use."""
        return sum(r is not None for r in self.running)

    # -- the loop --------------------------------------------------------------
    def run(self) -> None:
        """Step until `close()`, sleeping while there is nothing to do. A step
        that raises ends every request under way with finish reason "error"
        (`error` says why) rather than leaving them waiting forever; the loop
        goes on for the next ones."""
        while True:
            with self.lock:
                while not self._closed and not self.waiting and not self.busy:
                    self.lock.wait()
                if self._closed:
                    return
            try:
                self.step()
            except Exception as err:  # noqa: BLE001 - reported to every request it stopped
                self.fail(f"{type(err).__name__}: {err}")

    def fail(self, message: str) -> None:
        """End every running and waiting request with finish reason "error"."""
        with self.lock:
            self.error = message
            for slot, r in enumerate(self.running):
                if r is not None:
                    self._finish(slot, "error")
            while self.waiting:
                self._end(self.waiting.popleft(), "error")

    def step(self) -> None:
        """Drop cancelled requests, admit the waiting ones one prefill holds,
        decode one token for every running one."""
        with self.lock:
            for slot, r in enumerate(self.running):
                if r is not None and r.cancelled:
                    self._finish(slot, "cancelled")
            while self.waiting and self.waiting[0].cancelled:
                self._end(self.waiting.popleft(), "cancelled")
            free = [slot for slot, r in enumerate(self.running) if r is None]
            admit = []
            while (self.waiting and len(admit) < len(free) and self.engine.prefill_fits(
                    [len(r.prompt) for r in admit] + [len(self.waiting[0].prompt)])):
                admit.append(self.waiting.popleft())
            for slot, r in zip(free, admit):
                self.running[slot] = r
        if admit:
            self.engine.prefill(free[:len(admit)], [r.prompt for r in admit])
        running = list(self.running)
        if not any(r is not None for r in running):
            return
        n = self.engine.slots
        active = np.array([r is not None for r in running])
        temperature, top_p, seed, step = np.zeros(n), np.ones(n), np.zeros(n), np.zeros(n)
        for slot, r in enumerate(running):
            if r is not None:
                temperature[slot], top_p[slot] = r.temperature, r.top_p
                seed[slot], step[slot] = r.seed, len(r.tokens)
        tokens = self.engine.decode(active, temperature, top_p, seed, step)
        self.steps += 1
        with self.lock:
            for slot, r in enumerate(running):
                if r is not None and self.running[slot] is r:
                    self._advance(slot, r, int(tokens[slot]))

    def _advance(self, slot: int, r: Request, token: int) -> None:
        r.drawn += 1
        if token in self.stop_ids:
            return self._finish(slot, "stop")
        r.tokens.append(token)
        data = b"".join(self.token_bytes(t) for t in r.tokens)
        r.text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(data)
        cut = min((i for i in (r.text.find(s) for s in r.stop if s) if i >= 0), default=-1)
        if cut >= 0:
            r.text = r.text[:cut]
            return self._finish(slot, "stop")
        if len(r.tokens) >= r.max_tokens:
            r.text = data.decode("utf-8", errors="replace")
            return self._finish(slot, "length")
        # hold back a tail that may still grow into a stop string
        hold = max((k for s in r.stop for k in range(1, len(s))
                    if r.text.endswith(s[:k])), default=0)
        self._send(r, len(r.text) - hold, None)

    def _finish(self, slot: int, reason: str) -> None:
        r = self.running[slot]
        self.running[slot] = None
        self._end(r, reason)

    def _end(self, r: Request, reason: str) -> None:
        r.finish_reason = reason
        self.finished[reason] += 1
        self._send(r, len(r.text), reason)
        r.done.set()

    def _send(self, r: Request, upto: int, reason: str | None) -> None:
        if r.listener is not None and (upto > r.sent or reason is not None):
            delta, r.sent = r.text[r.sent:max(upto, r.sent)], max(upto, r.sent)
            r.listener(delta, reason)
