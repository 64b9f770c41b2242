"""Keep freed host memory in the process, so each train step reuses it.

On the CPU, XLA allocates every execution's scratch space afresh (60 MB a
step for the issue-sized model of NOTES.md, more for larger ones) from one
of its worker threads. With glibc's defaults that block is larger than the
largest size malloc serves from its heaps, so it is mapped with mmap and
unmapped again at the end of the step, and the next step touches 10-25
thousand fresh pages: each a page fault that the kernel answers with a
zeroed page. That was 5-15 % of a small model's CPU step (NOTES.md, v6).

`reuse_host_memory` changes three of glibc's malloc settings (``mallopt``)
for the whole process: large blocks come from the heap instead of mmap, the
heap keeps the memory freed at its top instead of returning it (all of it by
default, or up to ``keep_bytes``), and every thread shares the main heap (a
thread with its own arena would still create and delete a heap for each such
block). Memory freed by one step is then what the next step gets, with no
page faults. The cost is that the process holds on to memory it has freed.

Why keep all of it: the heap does not come back to a tidy state between
steps. Small allocations settle between the step's large blocks, so the
heap grows to a few times the step's scratch space before every block finds
room, and at times the free space at its top passes any fixed threshold. A
process that then returns that memory touches it all afresh over the next
steps: with a 1 GiB threshold, a loop of the issue-sized model's steps
returned and re-faulted 900 MB every ten to twenty steps (NOTES.md, v10).
Kept, the heap settles after a few dozen steps.

It must run before JAX starts its backend (the first computation or
``jax.devices()``): threads that have already allocated keep their own
heaps, so a later call changes nothing and says so. jaxllm's command line
and training benchmark call it first thing; a script of your own can do the
same.
"""

from __future__ import annotations

import ctypes
import platform
import sys
import warnings

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


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
    return True
