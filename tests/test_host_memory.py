"""reuse_host_memory: a freed large block is handed out again without page faults."""

import json
import subprocess
import sys
import warnings

import jax.numpy as jnp
import pytest

from jaxllm.host_memory import has_glibc, reuse_host_memory

glibc_only = pytest.mark.skipif(not has_glibc(), reason="mallopt settings are glibc's")

# A worker thread (as XLA's are) mallocs a 64 MB block, writes every page and
# frees it, three times; the child prints the page faults of the last round.
_CHILD = r"""
import ctypes, json, resource, sys, threading
from jaxllm.host_memory import reuse_host_memory
mode = sys.argv[1]  # "default" (glibc's settings), "reuse" (keep all) or "keep:<bytes>"
if mode == "default":
    applied = False
else:
    applied = reuse_host_memory(None if mode == "reuse" else int(mode.removeprefix("keep:")))
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size, faults = 64 << 20, []
def rounds():
    for _ in range(3):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(size)
        ctypes.memset(p, 1, size)
        libc.free(p)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
t = threading.Thread(target=rounds)
t.start(); t.join()
print(json.dumps({"applied": applied, "faults": faults}))
"""


def _child(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True,
                         timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_freed_block_is_reused_without_page_faults():
    pages = (64 << 20) // 4096
    default, reused = _child("default"), _child("reuse")
    # glibc's defaults map the block afresh each round: every page faults again.
    assert default["faults"][-1] > pages // 2, default
    assert reused["applied"] is True
    # The first round maps the memory; later rounds get the same pages back.
    assert reused["faults"][0] > pages // 2, reused
    assert reused["faults"][-1] < pages // 20, reused


@glibc_only
def test_keep_bytes_bounds_the_memory_kept():
    # The block lies at the heap's top: kept (the default) it comes back without
    # faults; with keep_bytes below its size glibc returns it at each free, and
    # every round touches fresh pages.
    pages = (64 << 20) // 4096
    kept, returned = _child("reuse"), _child("keep:1048576")
    assert kept["applied"] is True and returned["applied"] is True
    assert kept["faults"][-1] < pages // 20, kept
    assert returned["faults"][-1] > pages // 2, returned


def test_too_late_once_jax_has_started():
    jnp.ones(2).block_until_ready()  # this process's backend is up
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        applied = reuse_host_memory()
    assert applied is False
    if has_glibc():
        assert any("before the first JAX computation" in str(w.message) for w in caught)


def test_rejects_negative_keep_bytes():
    with pytest.raises(ValueError, match="keep_bytes must be >= 0 or None"):
        reuse_host_memory(-1)


# The command line's own process: what `jaxllm.host_memory.applied()` says after a command.
_CLI_CHILD = r"""
import json, sys
from jaxllm import cli, host_memory
rc = cli.main(sys.argv[1:])
print(json.dumps({"rc": rc, "applied": host_memory.applied()}))
"""


def _cli_child(*argv: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CLI_CHILD, *argv], capture_output=True,
                         text=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_cli_applies_it_to_pretrain_only_on_request(tmp_path):
    bad = ["--set", "colour=blue", "--out", str(tmp_path)]  # exits 2 once the configs are read
    asked = _cli_child("pretrain", "--reuse-host-memory", *bad)
    assert asked["rc"] == 2 and asked["applied"] == {"mmap_max": 0, "trim_threshold": -1,
                                                     "arena_max": 1}
    assert _cli_child("pretrain", *bad) == {"rc": 2, "applied": None}
    generate = _cli_child("generate", "--run-dir", str(tmp_path / "none"))
    assert generate["rc"] == 2 and generate["applied"] is None


def test_applied_is_none_until_it_takes_effect():
    import jaxllm.host_memory as host_memory

    jnp.ones(2).block_until_ready()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reuse_host_memory()
    assert host_memory.applied() is None  # too late in this process: nothing was set
