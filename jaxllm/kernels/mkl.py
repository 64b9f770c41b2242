"""Dense float32 matrix products on the CPU by Intel MKL, as an XLA custom call.

XLA's own CPU dot kernels run the shapes of a small GPT's dense layers 25-40 %
below MKL (PyTorch's CPU matrix library), most of all the weight-gradient
form x^T @ dy; see NOTES.md. `matmul` computes the same products through
MKL's `cblas_sgemm`, called from an XLA FFI handler (`mkl_sgemm.cc`) that
splits each product over XLA's own intra-op threads. It is what
`GPTConfig(matmul_impl="mkl")` uses for every dense layer.

The handler is compiled on first use with the C++ compiler (`$CXX`, else
`g++`) against the XLA FFI headers that ship with jaxlib and the MKL that
`pip install "jaxllm[mkl]"` installs, and cached under `$JAXLLM_CACHE_DIR`
(default `~/.cache/jaxllm`) keyed by the source, the jaxlib version and the
paths of the MKL libraries it links.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import shutil
import subprocess

import jax
import jax.numpy as jnp

TARGET = "jaxllm_mkl_sgemm"
SOURCE = pathlib.Path(__file__).with_name("mkl_sgemm.cc")
# MKL's LP64 interface with its sequential layer: threads come from XLA's pool.
_MKL_LIBS = ("libmkl_intel_lp64.so", "libmkl_sequential.so", "libmkl_core.so")


class MKLUnavailable(RuntimeError):
    """matmul_impl="mkl" cannot run here (no MKL, no compiler, or not a CPU)."""


def mkl_libraries() -> list[pathlib.Path]:
    """The MKL shared libraries to link, from the `mkl` wheel (or `$JAXLLM_MKL_LIB_DIR`)."""
    found: dict[str, pathlib.Path] = {}
    lib_dir = os.environ.get("JAXLLM_MKL_LIB_DIR")
    if lib_dir:
        candidates = sorted(pathlib.Path(lib_dir).glob("libmkl_*.so*"))
    else:
        try:
            dist = importlib.metadata.distribution("mkl")
            candidates = [pathlib.Path(dist.locate_file(f)) for f in dist.files or []
                          if f.name.startswith("libmkl_")]
        except importlib.metadata.PackageNotFoundError:
            candidates = []
    for path in candidates:
        for name in _MKL_LIBS:
            # libmkl_core.so.3, not libmkl_core.so.3.dbg or a static archive
            if path.name.startswith(name) and path.name[len(name):].lstrip(".").isdigit():
                found.setdefault(name, path)
    missing = [n for n in _MKL_LIBS if n not in found]
    if missing:
        where = f"in JAXLLM_MKL_LIB_DIR={lib_dir}" if lib_dir else "from the 'mkl' package"
        raise MKLUnavailable(
            f"matmul_impl='mkl' needs Intel MKL, but {where} these were not found: "
            f"{', '.join(missing)}; "
            "install it with: pip install 'jaxllm[mkl]' (x86-64 only), or use matmul_impl='xla'")
    return [found[n] for n in _MKL_LIBS]


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("JAXLLM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxllm")
    return pathlib.Path(root) / "kernels"


def build(libs: list[pathlib.Path]) -> pathlib.Path:
    """Compile the FFI handler (once per source, jaxlib version and MKL libraries) and
    return its path."""
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + jax.lib.__version__.encode()
                         + "\0".join(map(str, libs)).encode()).hexdigest()[:16]
    out = _cache_dir() / f"mkl_sgemm-{key}.so"
    if out.exists():
        return out
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        raise MKLUnavailable(f"matmul_impl='mkl' compiles a small C++ kernel on first use, "
                             f"but the compiler {cxx!r} was not found (set CXX)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    rpath = sorted({str(p.parent) for p in libs})
    cmd = [cxx, "-O2", "-std=c++17", "-shared", "-fPIC", "-w", f"-I{jax.ffi.include_dir()}",
           str(SOURCE), "-o", str(tmp), *map(str, libs), *(f"-Wl,-rpath,{d}" for d in rpath)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise MKLUnavailable(f"compiling {SOURCE.name} failed ({' '.join(cmd)}):\n{proc.stderr}")
    os.replace(tmp, out)  # atomic: an interrupted build leaves no half-written library
    return out


@functools.cache
def register() -> str:
    """Build, load and register the handler with XLA's CPU backend (once per process)."""
    library = ctypes.CDLL(str(build(mkl_libraries())))
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.JaxllmMklSgemm), platform="cpu")
    return TARGET


def sgemm(a, b, *, trans_a: bool = False, trans_b: bool = False):
    """op(a) @ op(b) for 2-D float32 arrays, op a transpose where asked. Not differentiable."""
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"sgemm takes 2-D operands, got shapes {a.shape} and {b.shape}")
    if a.dtype != jnp.float32 or b.dtype != jnp.float32:
        raise ValueError(f"the MKL matmul computes in float32, got {a.dtype} and {b.dtype}")
    m, k = a.shape[::-1] if trans_a else a.shape
    k_b, n = b.shape[::-1] if trans_b else b.shape
    if k != k_b:
        raise ValueError(f"sgemm: contracting sizes differ ({a.shape}, trans_a={trans_a}; "
                         f"{b.shape}, trans_b={trans_b})")
    if jax.default_backend() != "cpu":
        raise MKLUnavailable(f"matmul_impl='mkl' is a CPU kernel, but JAX's default backend is "
                             f"{jax.default_backend()!r}; use matmul_impl='xla' there")
    if 0 in (m, n, k):
        return jnp.zeros((m, n), jnp.float32)
    out = jax.ShapeDtypeStruct((m, n), jnp.float32)
    return jax.ffi.ffi_call(register(), out, vmap_method="sequential")(
        a, b, trans_a=trans_a, trans_b=trans_b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x, w, transpose_w: bool = False):
    """x @ w (or x @ w.T), both 2-D float32, with gradients computed by MKL too.

    Neither backward product materialises a transpose: dx = g @ w.T and
    dw = x.T @ g are the same kernel with its transpose flags set.
    """
    return sgemm(x, w, trans_b=transpose_w)


def _matmul_fwd(x, w, transpose_w):
    return sgemm(x, w, trans_b=transpose_w), (x, w)


def _matmul_bwd(transpose_w, res, g):
    x, w = res
    dx = sgemm(g, w, trans_b=not transpose_w)
    dw = sgemm(g, x, trans_a=True) if transpose_w else sgemm(x, g, trans_a=True)
    return dx, dw


matmul.defvjp(_matmul_fwd, _matmul_bwd)
