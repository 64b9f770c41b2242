"""Automatic differentiation on a single neuron, computed four ways.

The worked example: input x = 1.1, target y = 1.0, weight w = 2.2, bias
b = 0.0; the neuron computes z = x*w + b, a = sigmoid(z), and the loss is the
binary cross-entropy L = -(y log a + (1 - y) log(1 - a)). Its gradients
dL/dw = -0.0898 and dL/db = -0.0817 come out the same from

* `grad_jax`: `jax.grad` of the loss (float32, or float64 on request),
* `grad_by_hand`: the chain rule dL/da * da/dz * dz/dw written out,
* `grad_finite_difference`: central differences of the loss in float64,
* `grad_torch`: PyTorch autograd (torch is imported only when called:
  it is a test dependency, not a runtime one).

x and w may also be vectors of one shape; the neuron then computes
z = sum(x * w) + b.
"""

from __future__ import annotations

import contextlib
import functools
from types import ModuleType
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# The seed's example: x, y, w, b.
SEED_EXAMPLE: dict[str, float] = {"x": 1.1, "y": 1.0, "w": 2.2, "b": 0.0}


class Gradients(NamedTuple):
    """The loss and its gradients with respect to w and b, as float64 numpy values."""

    loss: float
    w: np.ndarray
    b: float


def check_inputs(x, y, w, b) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The inputs as float64 arrays; ValueError when their shapes do not fit together."""
    x, y, w, b = (np.asarray(v, dtype=np.float64) for v in (x, y, w, b))
    if x.shape != w.shape:
        raise ValueError(f"x and w must have the same shape, got x {x.shape} and w {w.shape}")
    if x.ndim > 1:
        raise ValueError(f"x and w must be scalars or vectors, got shape {x.shape}")
    if y.shape != () or b.shape != ():
        raise ValueError(f"y and b must be scalars, got y {y.shape} and b {b.shape}")
    if not 0.0 <= float(y) <= 1.0:
        raise ValueError(f"the target y must be in [0, 1], got {float(y)}")
    return x, y, w, b


def binary_cross_entropy(probs, targets, xp: ModuleType = jnp):
    """Mean of -(t log p + (1 - t) log(1 - p)), logs clamped at -100 as in `torch.nn.BCELoss`.

    `xp` is the array module (`jax.numpy` or `numpy`), so one formula serves
    both the differentiated loss and the float64 reference.
    """
    log_p = xp.maximum(xp.log(probs), -100.0)
    log_not_p = xp.maximum(xp.log(1.0 - probs), -100.0)
    return xp.mean(-(targets * log_p + (1.0 - targets) * log_not_p))


def neuron_loss(w, b, x, y, xp: ModuleType = jnp):
    """The loss of the neuron a = sigmoid(sum(x * w) + b) against the target y."""
    z = xp.sum(x * w) + b
    a = 1.0 / (1.0 + xp.exp(-z))
    return binary_cross_entropy(a, y, xp)


def grad_jax(x, y, w, b, *, float64: bool = False) -> Gradients:
    """`jax.grad` of the loss with respect to (w, b).

    JAX computes in float32 by default; `float64=True` runs this one call in
    64-bit mode (`jax.enable_x64`) without changing the global setting.
    """
    x, y, w, b = check_inputs(x, y, w, b)
    with jax.enable_x64(True) if float64 else contextlib.nullcontext():
        x, y, w, b = (jnp.asarray(v) for v in (x, y, w, b))
        loss, (dw, db) = jax.value_and_grad(neuron_loss, argnums=(0, 1))(w, b, x, y)
        return _as_gradients(loss, dw, db)


def grad_by_hand(x, y, w, b) -> Gradients:
    """The chain rule written out in float64: dL/dw = dL/da * da/dz * dz/dw."""
    x, y, w, b = check_inputs(x, y, w, b)
    z = np.sum(x * w) + b
    a = 1.0 / (1.0 + np.exp(-z))
    dloss_da = -y / a + (1.0 - y) / (1.0 - a)
    da_dz = a * (1.0 - a)  # derivative of the sigmoid
    dloss_dz = dloss_da * da_dz  # simplifies to a - y
    dz_dw, dz_db = x, 1.0
    return _as_gradients(neuron_loss(w, b, x, y, np), dloss_dz * dz_dw, dloss_dz * dz_db)


def grad_finite_difference(x, y, w, b, eps: float = 1e-6) -> Gradients:
    """Central differences (L(p + eps) - L(p - eps)) / (2 eps) in float64, one entry at a time."""
    x, y, w, b = check_inputs(x, y, w, b)

    def loss(w_, b_):
        return float(neuron_loss(w_, b_, x, y, np))

    dw = np.zeros_like(w)
    for i in np.ndindex(w.shape):
        step = np.zeros_like(w)
        step[i] = eps
        dw[i] = (loss(w + step, b) - loss(w - step, b)) / (2 * eps)
    db = (loss(w, b + eps) - loss(w, b - eps)) / (2 * eps)
    return _as_gradients(loss(w, b), dw, db)


def grad_torch(x, y, w, b) -> Gradients:
    """PyTorch autograd in float64, written the way a PyTorch user would."""
    import torch
    import torch.nn.functional as F

    x, y, w, b = (torch.tensor(v, dtype=torch.float64) for v in check_inputs(x, y, w, b))
    w.requires_grad_(True)
    b.requires_grad_(True)
    z = (x * w).sum() + b
    a = torch.sigmoid(z)
    loss = F.binary_cross_entropy(a, y)
    loss.backward()
    return _as_gradients(loss.detach().numpy(), w.grad.numpy(), b.grad.numpy())


METHODS: dict[str, Callable[..., Gradients]] = {
    "jax.grad": functools.partial(grad_jax, float64=True),
    "by hand": grad_by_hand,
    "finite difference": grad_finite_difference,
    "torch autograd": grad_torch,
}


def all_gradients(x, y, w, b) -> dict[str, Gradients]:
    """The gradients from every method in `METHODS`."""
    return {name: method(x, y, w, b) for name, method in METHODS.items()}


def max_difference(a: Gradients, b: Gradients) -> float:
    """Largest absolute difference between two results (loss and both gradients)."""
    return max(abs(a.loss - b.loss), float(np.max(np.abs(a.w - b.w), initial=0.0)), abs(a.b - b.b))


def _as_gradients(loss: Any, dw: Any, db: Any) -> Gradients:
    return Gradients(float(loss), np.asarray(dw, dtype=np.float64), float(db))
