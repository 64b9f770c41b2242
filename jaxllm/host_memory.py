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
heap keeps up to ``keep_bytes`` of freed memory instead of returning it, and
every thread shares the main heap (a thread with its own arena would still
create and delete a heap for each such block). Memory freed by one step is
then what the next step gets, with no page faults. The cost is that the
process holds on to memory it has freed, up to ``keep_bytes``.

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


def reuse_host_memory(keep_bytes: int = 1 << 30) -> bool:
    """Set glibc's malloc to reuse freed blocks. True if it was set; False where
    the C library is not glibc (macOS, musl: nothing to change) or, with a
    warning, where JAX's backend has already started (too late to take effect)."""
    if keep_bytes < 0:
        raise ValueError(f"keep_bytes must be >= 0, got {keep_bytes}")
    if not has_glibc():
        return False
    if _jax_started():
        warnings.warn("reuse_host_memory() left malloc unchanged: JAX's backend has already "
                      "started, and its threads keep the heaps they have; call it before the "
                      "first JAX computation", RuntimeWarning, stacklevel=2)
        return False
    libc = ctypes.CDLL("libc.so.6")
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, min(keep_bytes, 2**31 - 1)),
                (_M_ARENA_MAX, 1))
    for param, value in settings:
        if libc.mallopt(param, value) != 1:
            raise OSError(f"glibc mallopt({param}, {value}) failed")
    return True
