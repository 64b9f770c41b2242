"""Keep freed host memory in the process, so each train step reuses it.

On the CPU, XLA allocates every execution's scratch space afresh from one of
its worker threads. With glibc's defaults a block that large is beyond what
malloc serves from its heaps, so it is mapped with mmap and unmapped again at
the end of the step, and the next step touches thousands of fresh pages: each
a page fault that the kernel answers with a zeroed page. For a small model's
CPU training step that is a noticeable share of the step (NOTES.md has the
measurements).

`reuse_host_memory` changes three of glibc's malloc settings (``mallopt``)
for the whole process: large blocks come from the heap instead of mmap, the
heap keeps the memory freed at its top instead of returning it (all of it by
default, or up to ``keep_bytes``), and every thread shares the main heap (a
thread with its own arena would still create and delete a heap for each such
block). Memory freed by one step is then what the next step gets, with no
page faults. The cost is that the process holds on to memory it has freed:
worth it for a long run of identical training steps, not for a process that
allocates once (generation) or shares the machine's memory with others.

Why keep all of it: the heap does not come back to a tidy state between
steps. Small allocations settle between the step's large blocks, so the
heap grows to a few times the step's scratch space before every block finds
room, and at times the free space at its top passes any fixed threshold. A
process that then returns that memory touches it all afresh over the next
steps. Kept, the heap settles after a few dozen steps.

It must run before JAX starts its backend (the first computation or
``jax.devices()``): threads that have already allocated keep their own
heaps, so a later call changes nothing and says so. `jaxllm pretrain` calls
it with ``--reuse-host-memory`` (or ``--cpu-recipe``), and the training
benchmark for both frameworks; a script of your own can call it first
thing. `applied()` says whether, and with what, it took effect.
"""

from __future__ import annotations

import ctypes
import platform
import sys
import warnings

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8

# The settings this process applied, {"mmap_max", "trim_threshold", "arena_max"}; None if none.
_applied: dict[str, int] | None = None


def has_glibc() -> bool:
    """Whether this process runs on Linux with glibc, whose malloc this module tunes."""
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _jax_started() -> bool:
    if "jax" not in sys.modules:  # not imported, so not started (and no import needed)
        return False
    from jax._src import xla_bridge

    return getattr(xla_bridge, "backends_are_initialized", lambda: False)()


def reuse_host_memory(keep_bytes: int | None = None) -> bool:
    """Set glibc's malloc to reuse freed blocks. True if it was set; False where
    the C library is not glibc (macOS, musl: nothing to change) or, with a
    warning, where JAX's backend has already started (too late to take effect).

    keep_bytes: the free memory at the heap's top that glibc keeps rather than
    returns; None (the default) keeps all of it.
    """
    if keep_bytes is not None and keep_bytes < 0:
        raise ValueError(f"keep_bytes must be >= 0 or None, got {keep_bytes}")
    if not has_glibc():
        return False
    if _jax_started():
        warnings.warn("reuse_host_memory() left malloc unchanged: JAX's backend has already "
                      "started, and its threads keep the heaps they have; call it before the "
                      "first JAX computation", RuntimeWarning, stacklevel=2)
        return False
    libc = ctypes.CDLL("libc.so.6")
    # -1 turns trimming off (mallopt(3)); a byte count is capped to mallopt's int
    trim = -1 if keep_bytes is None else min(keep_bytes, 2**31 - 1)
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, trim), (_M_ARENA_MAX, 1))
    for param, value in settings:
        if libc.mallopt(param, value) != 1:
            raise OSError(f"glibc mallopt({param}, {value}) failed")
    global _applied
    _applied = {"mmap_max": 0, "trim_threshold": trim, "arena_max": 1}
    return True


def applied() -> dict[str, int] | None:
    """The malloc settings `reuse_host_memory` set in this process, or None if it
    has not taken effect here."""
    return None if _applied is None else dict(_applied)
