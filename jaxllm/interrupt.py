"""Clean stops on SIGINT (Ctrl-C) and SIGTERM for the `jaxllm` command.

A `KeyboardInterrupt` raised wherever the main thread happens to be is not
safe in a JAX process: raised while jaxlib's nanobind extension is being
imported, it frees the half-built module and the process segfaults; raised in
a callback XLA makes (its garbage-collection callback), it is swallowed; and
a command that unwound out of its first compilation and returned could crash
in the interpreter's teardown (`Segmentation fault`, exit 139). So the command
never raises it. `install()` (run by `import jaxllm` when the process is the
`jaxllm` command, before JAX loads) turns both signals into a byte on a pipe
that a watcher thread reads, which it does even while the main thread is
inside native code:

- by default a stop is immediate: the output so far is flushed, one line says
  what stopped, and the process ends with `os._exit`, without unwinding
  through JAX or tearing the interpreter down. The exit code is the shell's
  convention, 128 + the signal number: 130 for SIGINT, 143 for SIGTERM;
- inside `deferred()` (a training loop's steps, `jaxllm launch` waiting on its
  processes) a stop is a request: `requested()` turns true, the loop saves a
  checkpoint at the next step boundary and raises `Stopped`. If that takes
  more than `grace_s` seconds, or a second signal comes, the process ends at
  once as above; the checkpoints already written are kept.

A multi-process run (jax.distributed) must stop every process at the same
step, since a checkpoint save is collective. JAX's preemption service owns
SIGTERM there (its notifier takes the signal over at `jax.distributed
.initialize`) and agrees on that step across the processes; `stop_due(step)`,
which every process calls at every step, asks it
(`multihost_utils.reached_preemption_sync_point`), and a SIGINT is passed on
to it as a SIGTERM to the process itself.

Only the standard library is imported here: it runs before JAX loads.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_S = 60.0  # how long a deferred stop may take (a checkpoint save) before the process ends
FLUSH_S = 2.0  # how long an immediate stop waits on a blocked output before ending anyway

_name = "jaxllm"
_installed = False
_requested: int | None = None
_deferring = 0
_grace = GRACE_S
_lock = threading.Lock()


class Stopped(Exception):
    """A training loop stopped at a step boundary on a signal (its checkpoint saved)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return exit_code(self.signum)


def exit_code(signum: int) -> int:
    """The shell's exit code for a process ended by `signum`: 128 + its number."""
    return 128 + int(signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def is_command() -> bool:
    """Whether this process is the `jaxllm` command (its console script, or `python -m jaxllm`)."""
    argv = list(getattr(sys, "orig_argv", []))
    as_module = any(a == "-m" and b == "jaxllm" for a, b in zip(argv, argv[1:]))
    return as_module or os.path.basename(sys.argv[0] if sys.argv else "") == "jaxllm"


def install_for_command() -> None:
    """`install()` when this process is the `jaxllm` command (a library import changes nothing)."""
    if is_command() and threading.current_thread() is threading.main_thread():
        install()


def install(name: str | None = None) -> None:
    """Handle SIGINT and SIGTERM as this module describes (from the main thread,
    once; later calls only rename the command the stop line names)."""
    global _installed, _name
    if name:
        _name = name
    if _installed:
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    for signum in SIGNALS:
        # The Python-level handler does nothing: the interpreter's C handler writes
        # the signal number to the wakeup pipe, and the watcher acts on it.
        signal.signal(signum, _ignore)
    signal.set_wakeup_fd(write, warn_on_full_buffer=False)
    threading.Thread(target=_watch, args=(read,), name="jaxllm-stop", daemon=True).start()
    _installed = True


def requested() -> int | None:
    """The signal that asked this process to stop, if one did."""
    return _requested


@contextlib.contextmanager
def deferred(grace_s: float = GRACE_S):
    """Inside the block, a signal asks for a stop (`requested()`) instead of
    ending the process; the block must then stop within `grace_s` seconds."""
    global _deferring, _grace
    with _lock:
        _deferring += 1
        _grace = grace_s
    try:
        yield
    finally:
        with _lock:
            _deferring -= 1


def stop_due(step: int) -> bool:
    """Whether a training loop stops after `step`. In a multi-process run every
    process must call it at every step (JAX's preemption sync point)."""
    if _preemption_service() is not None:
        from jax.experimental import multihost_utils

        return multihost_utils.reached_preemption_sync_point(step)
    return _requested is not None


def stop_signal() -> int:
    """The signal a stop that `stop_due` reported came from (SIGTERM when only
    JAX's preemption service saw it)."""
    return _requested or signal.SIGTERM


# -- the watcher -----------------------------------------------------------------
def _ignore(signum, frame) -> None:
    pass


def _preemption_service():
    """JAX's preemption sync manager when this process has joined a multi-process run."""
    distributed = sys.modules.get("jax._src.distributed")
    state = getattr(distributed, "global_state", None)
    if state is None or state.client is None:
        return None
    return state.preemption_sync_manager


def _watch(fd: int) -> None:
    while True:
        try:
            data = os.read(fd, 64)
        except OSError:
            return
        for signum in data:
            _on_signal(signum)


def _on_signal(signum: int) -> None:
    global _requested
    if signum not in SIGNALS:
        return
    with _lock:
        first = _requested is None
        if first and _deferring:
            _requested = signum
            grace = _grace
        elif first:
            _requested = signum
            grace = None
        else:
            grace = -1.0
    if grace is None:
        _exit_now(signum, f"stopped by {signal_name(signum)}")
    elif grace < 0:
        _exit_now(_requested, f"stopped at once by a second {signal_name(signum)} (the "
                              f"checkpoints already written are kept)")
    else:
        if signum == signal.SIGINT and _preemption_service() is not None:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier: every process stops
        timer = threading.Timer(grace, _exit_now, (signum, (
            f"stopped by {signal_name(signum)}; no clean stop within {grace:.0f} s, so it "
            f"ended at once (the checkpoints already written are kept)")))
        timer.daemon = True
        timer.start()


def _exit_now(signum: int, message: str) -> None:
    """Flush what was written, say `message` on one line and end the process."""
    code = exit_code(signum)
    guard = threading.Timer(FLUSH_S, os._exit, (code,))  # a blocked output cannot hold it
    guard.daemon = True
    guard.start()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        newline = "\n" if sys.stderr.isatty() else ""  # after the terminal's ^C
        sys.stderr.write(f"{newline}{_name}: {message}\n")
        sys.stderr.flush()
    os._exit(code)
