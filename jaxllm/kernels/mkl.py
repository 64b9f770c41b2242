"""Dense products and causal attention on the CPU by Intel MKL, as XLA custom calls.

On Intel CPUs XLA's own CPU dot kernels run the shapes of a small GPT's dense
layers below MKL (PyTorch's CPU matrix library), most of all the
weight-gradient form x^T @ dy; on other CPUs MKL takes a generic path and
XLA's dots are the faster (`jaxllm.kernels.recipe`). `matmul`
computes the same products through MKL's `cblas_sgemm`, called from an XLA
FFI handler (`mkl_sgemm.cc`) that splits each product over XLA's own
intra-op threads. It is what `GPTConfig(matmul_impl="mkl")` uses for every
dense layer.

`attention` is causal multi-head attention read straight from the qkv
projection's output (`mkl_attention.cc`): MKL products per (sequence, head)
pair with the softmax in between, no head split, transpose or concatenation
in the graph, forward and backward. It is `GPTConfig(attn_impl="mkl")`.

`layer_norm` (`rowwise.cc`: no MKL calls, built into the same library) is
LayerNorm as one forward and one backward kernel, where XLA's CPU backend
runs a dozen small ops; it is `GPTConfig(norm_impl="rowwise")`. Under
`matmul_impl="mkl"` the dense layers' bias gradients are one `column_sum`
each (`add_bias`), and the feed-forward's first layer is `dense_gelu`: the
bias and GELU applied to the product's panels as MKL finishes them.
`token_nll` is the cross-entropy per position as one pass over the logits
forward and one backward; it is `GPTConfig(loss_impl="rowwise")`.

The handlers are compiled on first use, into one library, with the C++
compiler (`$CXX`, else `g++`, for this machine's CPU: `-march=native`) against
the XLA FFI headers that ship with jaxlib and the MKL that
`pip install "jaxllm[mkl]"` installs. The library is cached under
`$JAXLLM_CACHE_DIR` (default `~/.cache/jaxllm`) keyed by the sources, the
compiler and its flags, the CPU's model and features, the jaxlib version and
the paths of the MKL libraries it links.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import os
import pathlib
import platform
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.kernels.recipe import cpuinfo_field

TARGET = "jaxllm_mkl_sgemm"
ATTENTION_FWD, ATTENTION_BWD = "jaxllm_mkl_attention_fwd", "jaxllm_mkl_attention_bwd"
LAYER_NORM_FWD, LAYER_NORM_BWD = "jaxllm_layer_norm_fwd", "jaxllm_layer_norm_bwd"
COLUMN_SUM = "jaxllm_column_sum"
DENSE_GELU, GELU_BWD = "jaxllm_mkl_dense_gelu", "jaxllm_gelu_bwd"
CROSS_ENTROPY_FWD, CROSS_ENTROPY_BWD = "jaxllm_cross_entropy_fwd", "jaxllm_cross_entropy_bwd"
_HERE = pathlib.Path(__file__).parent
SOURCES = (_HERE / "mkl_sgemm.cc", _HERE / "mkl_attention.cc", _HERE / "rowwise.cc")
HEADERS = (_HERE / "parallel.h", _HERE / "fast_math.h")
_FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-w")
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


def _cpu_identity() -> str:
    """The CPU model and feature flags (the build is `-march=native`)."""
    fields = [cpuinfo_field(k) for k in ("model name", "flags")]
    return "\n".join(f for f in fields if f) or platform.processor() or platform.machine()


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def available() -> bool:
    """Whether the kernels can be built here: MKL is installed and the compiler is found."""
    try:
        mkl_libraries()
    except MKLUnavailable:
        return False
    return shutil.which(_compiler()) is not None


def build(libs: list[pathlib.Path]) -> pathlib.Path:
    """Compile the FFI handlers into one library (once per sources, compiler, CPU,
    jaxlib version and MKL libraries) and return its path."""
    cxx = _compiler()
    code = b"".join(p.read_bytes() for p in (*SOURCES, *HEADERS))
    key = hashlib.sha256(b"\0".join([
        code, jax.lib.__version__.encode(), "\0".join(map(str, libs)).encode(),
        " ".join((cxx, *_FLAGS)).encode(), _cpu_identity().encode()])).hexdigest()[:16]
    out = _cache_dir() / f"jaxllm_mkl-{key}.so"
    if out.exists():
        return out
    if shutil.which(cxx) is None:
        raise MKLUnavailable(f"the MKL kernels (matmul_impl or attn_impl 'mkl') are compiled on "
                             f"first use, but the C++ compiler {cxx!r} was not found (set CXX)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    rpath = sorted({str(p.parent) for p in libs})
    cmd = [cxx, *_FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{_HERE}", *map(str, SOURCES),
           "-o", str(tmp), *map(str, libs), *(f"-Wl,-rpath,{d}" for d in rpath)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise MKLUnavailable(f"compiling the MKL kernels failed ({' '.join(cmd)}):\n{proc.stderr}")
    os.replace(tmp, out)  # atomic: an interrupted build leaves no half-written library
    return out


@functools.cache
def register() -> str:
    """Build, load and register the handlers with XLA's CPU backend (once per process)."""
    library = ctypes.CDLL(str(build(mkl_libraries())))
    for target, symbol in ((TARGET, library.JaxllmMklSgemm),
                           (ATTENTION_FWD, library.JaxllmMklAttentionFwd),
                           (ATTENTION_BWD, library.JaxllmMklAttentionBwd),
                           (LAYER_NORM_FWD, library.JaxllmLayerNormFwd),
                           (LAYER_NORM_BWD, library.JaxllmLayerNormBwd),
                           (COLUMN_SUM, library.JaxllmColumnSum),
                           (DENSE_GELU, library.JaxllmMklDenseGelu),
                           (GELU_BWD, library.JaxllmGeluBwd),
                           (CROSS_ENTROPY_FWD, library.JaxllmCrossEntropyFwd),
                           (CROSS_ENTROPY_BWD, library.JaxllmCrossEntropyBwd)):
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
    return TARGET


def _check_cpu(field: str, alternative: str, value: str = "mkl") -> None:
    if jax.default_backend() != "cpu":
        raise MKLUnavailable(f"{field}={value!r} is a CPU kernel, but JAX's default backend is "
                             f"{jax.default_backend()!r}; use {field}={alternative!r} there")


def _product_shape(a, b, trans_a: bool = False, trans_b: bool = False) -> tuple[int, int, int]:
    """(m, k, n) of op(a) @ op(b), after checking the operands and the backend."""
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"sgemm takes 2-D operands, got shapes {a.shape} and {b.shape}")
    if a.dtype != jnp.float32 or b.dtype != jnp.float32:
        raise ValueError(f"the MKL matmul computes in float32, got {a.dtype} and {b.dtype}")
    m, k = a.shape[::-1] if trans_a else a.shape
    k_b, n = b.shape[::-1] if trans_b else b.shape
    if k != k_b:
        raise ValueError(f"sgemm: contracting sizes differ ({a.shape}, trans_a={trans_a}; "
                         f"{b.shape}, trans_b={trans_b})")
    _check_cpu("matmul_impl", "xla")
    return m, k, n


def sgemm(a, b, *, trans_a: bool = False, trans_b: bool = False):
    """op(a) @ op(b) for 2-D float32 arrays, op a transpose where asked. Not differentiable."""
    m, k, n = _product_shape(a, b, trans_a, trans_b)
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


# Query rows per block of the attention kernel: smaller blocks compute less of
# the masked upper triangle (62.5 % of the score matrix at seq 256 against 75 %
# with 128 rows) at about the same product rate.
ATTENTION_BLOCK = 64


def attention_probs_per_pair(seq: int, block: int = ATTENTION_BLOCK) -> int:
    """Floats the attention kernel keeps per (sequence, head) pair when it saves
    the probabilities: each query block's rows times the keys it sees."""
    blocks = -(-seq // block)
    last_rows = seq - (blocks - 1) * block
    return block * block * (blocks - 1) * blocks // 2 + last_rows * seq


def attention_saves_probs(seq: int, emb: int, n_heads: int, block: int = ATTENTION_BLOCK) -> bool:
    """Whether `attention` keeps the probabilities for the backward by default:
    where they take no more memory than the feed-forward's hidden activation
    (4 * emb floats per position), which the backward keeps anyway. Longer
    sequences recompute them from the scores instead (GPT-2 124M beyond 448
    positions)."""
    return n_heads * attention_probs_per_pair(seq, block) <= 4 * emb * seq


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def attention(qkv, n_heads: int, save_probs: bool | None = None, block: int = ATTENTION_BLOCK):
    """Causal self-attention from the qkv projection's output, by MKL.

    qkv: float32 (batch, seq, 3 * emb), queries, keys and values side by side,
    each split into `n_heads` heads of emb // n_heads columns (the layout of
    `attention.split_qkv`). Returns (batch, seq, emb): every head's
    softmax(q k^T / sqrt(head_dim) + causal mask) v, heads side by side, the
    input of the attention's output projection. The gradient is a (batch,
    seq, 3 * emb) array in the same layout, computed by the backward kernel.

    `save_probs`: whether the forward keeps the attention probabilities for
    the backward (batch * n_heads * `attention_probs_per_pair(seq)` floats)
    instead of the backward recomputing them; None decides by
    `attention_saves_probs`. `block`: query rows per block. Neither changes
    the result beyond float32 rounding.
    """
    return _attention_fwd(qkv, n_heads, save_probs, block)[0]


def _attention_fwd(qkv, n_heads, save_probs, block):
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * n_heads):
        raise ValueError(f"attention takes qkv of shape (batch, seq, 3 * n_heads * head_dim) with "
                         f"n_heads={n_heads}, got {qkv.shape}")
    if qkv.dtype != jnp.float32:
        raise ValueError(f"attn_impl='mkl' computes in float32, got {qkv.dtype}")
    if block < 1:
        raise ValueError(f"attention's block must be >= 1, got {block}")
    _check_cpu("attn_impl", "blockwise")
    b, t, width = qkv.shape
    if save_probs is None:
        save_probs = attention_saves_probs(t, width // 3, n_heads, block)
    out = jax.ShapeDtypeStruct((b, t, width // 3), jnp.float32)
    if 0 in (b, t):
        return jnp.zeros(out.shape, out.dtype), (qkv, None, None, None)
    lse = jax.ShapeDtypeStruct((b, n_heads, t), jnp.float32)
    # Not kept: one float, as the handler takes a buffer either way.
    probs = jax.ShapeDtypeStruct(
        (b, n_heads, attention_probs_per_pair(t, block)) if save_probs else (1,), jnp.float32)
    register()
    o, lse, p = jax.ffi.ffi_call(ATTENTION_FWD, (out, lse, probs), vmap_method="sequential")(
        qkv, heads=np.int64(n_heads), block=np.int64(block), save_probs=bool(save_probs))
    return o, (qkv, o, lse, p)


def _attention_bwd(n_heads, save_probs, block, res, g):
    qkv, o, lse, probs = res
    if 0 in qkv.shape[:2]:
        return (jnp.zeros_like(qkv),)
    grad = jax.ffi.ffi_call(ATTENTION_BWD, jax.ShapeDtypeStruct(qkv.shape, jnp.float32),
                            vmap_method="sequential")(
        qkv, o, lse, probs, g.astype(jnp.float32), heads=np.int64(n_heads),
        block=np.int64(block), save_probs=probs.ndim == 3)
    return (grad,)


attention.defvjp(_attention_fwd, _attention_bwd)


def column_sum(g):
    """g.sum(0) for a 2-D float32 array, by one kernel call (rows split over the pool)."""
    if g.ndim != 2 or g.dtype != jnp.float32:
        raise ValueError(f"column_sum takes a 2-D float32 array, got {g.dtype} {g.shape}")
    if 0 in g.shape:
        return jnp.zeros(g.shape[1:], jnp.float32)
    register()
    return jax.ffi.ffi_call(COLUMN_SUM, jax.ShapeDtypeStruct(g.shape[1:], jnp.float32),
                            vmap_method="sequential")(g)


@jax.custom_vjp
def add_bias(y, b):
    """y + b over y's last axis, the bias gradient (dy summed over rows) by `column_sum`.

    XLA's CPU backend runs that sum as a library call many times slower than
    one pass of the kernel at a dense layer's shapes.
    """
    return y + b


def _add_bias_fwd(y, b):
    return y + b, None


def _add_bias_bwd(_, g):
    return g, column_sum(g.reshape(-1, g.shape[-1]))


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


@jax.custom_vjp
def dense_gelu(x, w, b):
    """GELU (tanh form) of x @ w + b, for 2-D float32 x: the feed-forward's first layer.

    The bias and GELU are applied to each panel of the product as MKL finishes
    it, while it is in cache; the backward is one kernel for GELU's derivative
    and the bias gradient, then the two products.
    """
    return _dense_gelu_fwd(x, w, b)[0]


def _dense_gelu_fwd(x, w, b):
    m, k, n = _product_shape(x, w)
    if b.shape != (n,) or b.dtype != jnp.float32:
        raise ValueError(f"dense_gelu: a float32 bias of shape ({n},) for {n} columns, got "
                         f"{b.dtype} {b.shape}")
    if 0 in (m, n, k):
        pre = jnp.broadcast_to(b, (m, n))
        return jax.nn.gelu(pre, approximate=True), (x, w, pre)
    register()
    out = jax.ShapeDtypeStruct((m, n), jnp.float32)
    y, pre = jax.ffi.ffi_call(DENSE_GELU, (out, out), vmap_method="sequential")(x, w, b)
    return y, (x, w, pre)


def _dense_gelu_bwd(res, g):
    x, w, pre = res
    if 0 in pre.shape:
        dpre, db = jnp.zeros_like(pre), jnp.zeros(pre.shape[1:], jnp.float32)
    else:
        dpre, db = jax.ffi.ffi_call(
            GELU_BWD, (jax.ShapeDtypeStruct(pre.shape, jnp.float32),
                       jax.ShapeDtypeStruct(pre.shape[1:], jnp.float32)),
            vmap_method="sequential")(pre, g)
    return (*_matmul_bwd(False, (x, w), dpre), db)


dense_gelu.defvjp(_dense_gelu_fwd, _dense_gelu_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps: float):
    """LayerNorm over x's last axis (biased variance), float32, by `rowwise.cc`.

    The same function as `jaxllm.model.layer_norm`; the forward is one pass per
    row and saves only each row's mean and 1/std, the backward is one kernel
    that returns dx, dscale and dbias. It is `GPTConfig(norm_impl="rowwise")`.
    """
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    d = x.shape[-1] if x.ndim else None
    if x.ndim == 0 or scale.shape != (d,) or bias.shape != (d,):
        raise ValueError(f"layer_norm takes x (..., d) with scale and bias (d,), got "
                         f"{x.shape}, {scale.shape}, {bias.shape}")
    if not x.dtype == scale.dtype == bias.dtype == jnp.float32:
        raise ValueError(f"norm_impl='rowwise' computes in float32, got {x.dtype}, "
                         f"{scale.dtype}, {bias.dtype}")
    _check_cpu("norm_impl", "xla", "rowwise")
    rows = jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32)
    if x.size == 0:
        return jnp.zeros_like(x), (x, scale, jnp.zeros(rows.shape), jnp.zeros(rows.shape))
    register()
    y, mean, rstd = jax.ffi.ffi_call(
        LAYER_NORM_FWD, (jax.ShapeDtypeStruct(x.shape, jnp.float32), rows, rows),
        vmap_method="sequential")(x, scale, bias, eps=np.float32(eps))
    return y, (x, scale, mean, rstd)


def _layer_norm_bwd(eps, res, g):
    x, scale, mean, rstd = res
    if x.size == 0:
        return jnp.zeros_like(x), jnp.zeros_like(scale), jnp.zeros_like(scale)
    vec = jax.ShapeDtypeStruct(scale.shape, jnp.float32)
    return tuple(jax.ffi.ffi_call(
        LAYER_NORM_BWD, (jax.ShapeDtypeStruct(x.shape, jnp.float32), vec, vec),
        vmap_method="sequential")(x, scale, mean, rstd, g.astype(jnp.float32)))


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@jax.custom_vjp
def token_nll(logits, targets):
    """-log softmax(logits)[target] per position, float32 logits (..., vocab), by
    `rowwise.cc`: the logsumexp and the target logit in one pass per row, the
    gradient softmax - one_hot in one more. Same values as
    `jaxllm.loss.token_nll`, NaN where a target is outside [0, vocab) or a
    logit is NaN, +inf where one is +inf; -inf logits take no probability.
    It is `GPTConfig(loss_impl="rowwise")`.
    """
    return _token_nll_fwd(logits, targets)[0]


def _token_nll_fwd(logits, targets):
    if logits.dtype != jnp.float32 or logits.ndim == 0 or targets.shape != logits.shape[:-1]:
        raise ValueError(f"token_nll takes float32 logits (..., vocab) and targets of their "
                         f"leading shape, got {logits.dtype} {logits.shape} and {targets.shape}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"token_nll takes integer targets, got {targets.dtype}")
    _check_cpu("loss_impl", "xla", "rowwise")
    vocab = logits.shape[-1]
    # int32 for the kernel; an id outside the vocabulary (however wide) becomes -1,
    # so no wide id wraps into range
    ids = jnp.where((targets >= 0) & (targets < vocab), targets, -1).astype(jnp.int32)
    if logits.size == 0:
        lse = jnp.full(targets.shape, -jnp.inf, jnp.float32)
        return jnp.full(targets.shape, jnp.nan, jnp.float32), (logits, lse, ids)
    register()
    rows = jax.ShapeDtypeStruct(targets.shape, jnp.float32)
    nll, lse = jax.ffi.ffi_call(CROSS_ENTROPY_FWD, (rows, rows),
                                vmap_method="sequential")(logits, ids)
    return nll, (logits, lse, ids)


def _token_nll_bwd(res, g):
    logits, lse, ids = res
    if logits.size == 0:
        return jnp.zeros_like(logits), None
    grad = jax.ffi.ffi_call(CROSS_ENTROPY_BWD, jax.ShapeDtypeStruct(logits.shape, jnp.float32),
                            vmap_method="sequential")(logits, lse, ids, g.astype(jnp.float32))
    return grad, None


token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)
