"""The fastest training settings for this machine's CPU.

Which product kernel wins is a property of the CPU, not of the model. MKL
dispatches its AVX-512 kernels only on Intel processors: on an Intel Xeon its
`cblas_sgemm` beats XLA's own dot kernels on the model's shapes, while on an
AMD EPYC it takes a generic path and loses to them (NOTES.md has the
measurements). The other native kernels
(attention, LayerNorm, cross-entropy) are built with `-march=native` and pay on
both. Micro-batches (each batch run in parts whose activations stay in the
cores' caches) paid with MKL's products on the Xeon and not with XLA's on the
EPYC. `cpu_recipe()` returns the settings for the CPU it runs on, as `--set`
takes them: GPTConfig fields plus TrainConfig's `grad_accum`.
"""

from __future__ import annotations

import pathlib
import platform
from typing import Any

NATIVE_KERNELS = {"attn_impl": "mkl", "norm_impl": "rowwise", "loss_impl": "rowwise"}
# Micro-batches per step with MKL's products: their activations stay in the caches.
MKL_GRAD_ACCUM = 2


def cpuinfo_field(key: str) -> str:
    """The first value of `key` ("vendor_id", "model name", "flags") in /proc/cpuinfo, or ""."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == key:
            return value.strip()
    return ""


def cpu_vendor() -> str:
    """The CPU's vendor ("GenuineIntel", "AuthenticAMD"), or "" where /proc/cpuinfo is not."""
    return cpuinfo_field("vendor_id")


def cpu_recipe(vendor: str | None = None, machine: str | None = None,
               native_kernels: bool | None = None) -> dict[str, Any]:
    """Implementation settings that train fastest on this CPU (the same function:
    each is tested equal to the reference path).

    `vendor`, `machine` and `native_kernels` default to this machine's CPU
    vendor, `platform.machine()` and `jaxllm.kernels.mkl.available()` (MKL and
    a compiler); pass them to ask about another machine. Without the native
    kernels it is the defaults.
    """
    machine = platform.machine() if machine is None else machine
    if native_kernels is None:
        from jaxllm.kernels import mkl

        native_kernels = machine == "x86_64" and mkl.available()
    if machine != "x86_64" or not native_kernels:
        return {"grad_accum": 1}  # XLA's own kernels on whole batches: the defaults
    vendor = cpu_vendor() if vendor is None else vendor
    if vendor == "GenuineIntel":
        return {"matmul_impl": "mkl", **NATIVE_KERNELS, "grad_accum": MKL_GRAD_ACCUM}
    return {"matmul_impl": "xla", **NATIVE_KERNELS, "grad_accum": 1}
