"""Tensors in JAX next to PyTorch: creation, dtypes, shapes, reshape, transpose, matmul.

Each entry of `EXAMPLES` is one line of JAX and the PyTorch line it replaces;
`run_examples` evaluates both (the code shown is the code that runs) and
`compare` sets the results side by side. Most agree exactly. Where JAX differs
on purpose, `DIFFERENCES` says why and the functions below demonstrate it:

* A Python int becomes int32 in JAX, int64 in torch: JAX keeps 64-bit types
  off unless `jax_enable_x64` is set (`default_int_dtypes`).
* JAX arrays are immutable: `x[0] = 1` raises TypeError and
  `x = x.at[0].set(1)` returns an updated copy (`item_assignment`).
* JAX has no `.view(shape)`: reshape does the job, and since nothing can be
  written in place, whether memory is shared is invisible (`view_vs_reshape`).
* JAX arrays have no `.to(dtype)`: the numpy spelling `.astype(dtype)` is used.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Example(NamedTuple):
    name: str
    jax_code: str
    torch_code: str


# `m` is the 2 x 3 matrix [[1, 2, 3], [4, 5, 6]] in each library.
MATRIX = [[1, 2, 3], [4, 5, 6]]

EXAMPLES: tuple[Example, ...] = (
    Example("0-D from a Python int", "jnp.array(1)", "torch.tensor(1)"),
    Example("1-D from a list", "jnp.array([1, 2, 3])", "torch.tensor([1, 2, 3])"),
    Example("2-D from nested lists", "jnp.array([[1, 2], [3, 4]])", "torch.tensor([[1, 2], [3, 4]])"),
    Example("3-D from nested lists", "jnp.array([[[1, 2], [3, 4]], [[5, 6], [7, 8]]])",
            "torch.tensor([[[1, 2], [3, 4]], [[5, 6], [7, 8]]])"),
    Example("0-D from a Python float", "jnp.array(1.0)", "torch.tensor(1.0)"),
    Example("1-D floats", "jnp.array([1.0, 2.0, 3.0])", "torch.tensor([1.0, 2.0, 3.0])"),
    Example("cast to float32", "jnp.array([1, 2, 3]).astype(jnp.float32)",
            "torch.tensor([1, 2, 3]).to(torch.float32)"),
    Example("shape", "m.shape", "m.shape"),
    Example("reshape to 3 x 2", "m.reshape(3, 2)", "m.reshape(3, 2)"),
    Example("view as 3 x 2", "m.reshape(3, 2)", "m.view(3, 2)"),
    Example("transpose", "m.T", "m.T"),
    Example("matrix product m @ m.T", "m @ m.T", "m @ m.T"),
    Example("matmul function", "jnp.matmul(m, m.T)", "m.matmul(m.T)"),
)

DIFFERENCES: dict[str, str] = {
    "int dtype": "A Python int becomes int32 in JAX (64-bit types are off unless jax_enable_x64 "
                 "is set) and int64 in torch. Floats are float32 in both.",
    "immutability": "JAX arrays are immutable: `x[0] = 1` raises TypeError; "
                    "`x = x.at[0].set(1)` returns an updated copy. torch writes in place.",
    "view": "JAX has no `.view(shape)` (its `.view` only reinterprets a dtype and rejects shapes); "
            "use `reshape`. A torch view shares memory with its base, so writes show through.",
    "cast": "JAX arrays have no `.to(dtype)`; `.astype(dtype)` is the spelling (as in numpy).",
}


def _evaluate(code: str, namespace: dict[str, Any]) -> Any:
    # The expressions are the fixed strings of EXAMPLES, shown verbatim in reports.
    return eval(code, {"__builtins__": {}}, namespace)  # noqa: S307


def run_examples() -> dict[str, tuple[Any, Any]]:
    """Every example evaluated in both libraries: name -> (jax result, torch result)."""
    import torch

    jax_ns = {"jnp": jnp, "m": jnp.array(MATRIX)}
    torch_ns = {"torch": torch, "m": torch.tensor(MATRIX)}
    return {e.name: (_evaluate(e.jax_code, jax_ns), _evaluate(e.torch_code, torch_ns))
            for e in EXAMPLES}


def describe(value: Any) -> dict[str, Any]:
    """Shape, dtype name and values of a JAX array, torch tensor or shape tuple."""
    if isinstance(value, tuple):  # a shape
        return {"shape": None, "dtype": "tuple", "values": [int(v) for v in value]}
    dtype = str(value.dtype).removeprefix("torch.")
    return {"shape": list(value.shape), "dtype": dtype, "values": np.asarray(value).tolist()}


def compare() -> list[dict[str, Any]]:
    """One row per example: both lines of code, both results, and whether they agree."""
    results = run_examples()
    rows = []
    for e in EXAMPLES:
        jax_result, torch_result = (describe(r) for r in results[e.name])
        rows.append({
            "name": e.name, "jax_code": e.jax_code, "torch_code": e.torch_code,
            "jax": jax_result, "torch": torch_result,
            "same_values": jax_result["values"] == torch_result["values"],
            "same_shape": jax_result["shape"] == torch_result["shape"],
            "same_dtype": jax_result["dtype"] == torch_result["dtype"],
        })
    return rows


# -- where JAX differs on purpose ------------------------------------------------
def default_int_dtypes() -> dict[str, str]:
    """Dtype of `array(1)`: JAX by default, JAX with 64-bit mode, torch."""
    import torch

    with jax.enable_x64(True):
        x64 = str(jnp.array(1).dtype)
    return {"jax": str(jnp.array(1).dtype), "jax (x64 enabled)": x64,
            "torch": str(torch.tensor(1).dtype).removeprefix("torch.")}


def item_assignment() -> dict[str, Any]:
    """`x[0] = 1` in both libraries, and JAX's functional `x.at[0].set(1)`."""
    import torch

    x = jnp.array([5, 6, 7])
    try:
        x[0] = 1
        jax_error = None
    except TypeError as err:
        jax_error = f"TypeError: {str(err).splitlines()[0]}"
    updated = x.at[0].set(1)

    t = torch.tensor([5, 6, 7])
    t[0] = 1
    return {"jax_error": jax_error, "jax_at_set": updated.tolist(), "jax_original": x.tolist(),
            "torch_after_assignment": t.tolist()}


def view_vs_reshape() -> dict[str, Any]:
    """A write through a torch view reaches its base; JAX has no shape view to write through."""
    import torch

    t = torch.tensor(MATRIX)
    v = t.view(3, 2)
    v[0, 0] = 100
    m = jnp.array(MATRIX)
    try:
        m.view(3, 2)
        jax_view_error = None
    except (TypeError, NotImplementedError) as err:
        jax_view_error = f"{type(err).__name__}: {err}"
    r = m.reshape(3, 2).at[0, 0].set(100)
    return {"torch_base_after_view_write": t.tolist(), "jax_view_error": jax_view_error,
            "jax_reshaped_updated": r.tolist(), "jax_base_after": m.tolist()}
