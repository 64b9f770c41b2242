"""Backpropagation and one optimizer step on a small network, three ways.

The network (the seed's SimpleNet): Linear 10 -> 5, ReLU, Linear 5 -> 1,
Sigmoid, trained on binary cross-entropy with plain SGD (learning rate 0.01).

* Pure JAX: the parameters are a pytree `{"fc1": {"kernel", "bias"}, "fc2": ...}`,
  the network is a function of it, `jax.value_and_grad` gives the gradients and
  optax's `sgd` applies them (`train`).
* Flax NNX: the same network as a class with `nnx.Linear` layers and an
  `nnx.Optimizer`, the form a PyTorch user reaches for first (`SimpleNet`,
  `train_nnx`).
* PyTorch: the same network as an `nn.Module` with `torch.optim.SGD`
  (`train_torch`; torch is imported only when it is called).

Kernels are stored (in, out), so `x @ kernel` replaces torch's `x @ weight.T`;
copying weights across transposes them. Every trainer returns one `StepRecord`
per step with numpy values in the same tree layout, so the three can be
compared leaf by leaf.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxllm.basics.autodiff import binary_cross_entropy
from jaxllm.model import dense

Params = dict[str, dict[str, Any]]

IN_FEATURES, HIDDEN, OUT_FEATURES = 10, 5, 1
LEARNING_RATE = 0.01
LAYERS = {"fc1": (IN_FEATURES, HIDDEN), "fc2": (HIDDEN, OUT_FEATURES)}


class StepRecord(NamedTuple):
    """One training step: the loss before the update, the gradients, the parameters after it."""

    loss: float
    grads: Params
    params: Params


# -- data and initialisation --------------------------------------------------
def make_data(seed: int = 0, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Random float32 inputs (batch, 10) and 0/1 targets (batch, 1)."""
    rng = np.random.default_rng(seed)
    inputs = rng.standard_normal((batch, IN_FEATURES)).astype(np.float32)
    targets = rng.integers(0, 2, (batch, OUT_FEATURES)).astype(np.float32)
    return inputs, targets


def uniform_fan_in_init(fan_in: int):
    """PyTorch's `nn.Linear` default for weights and biases: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def init_params(key: jax.Array) -> Params:
    """A fresh parameter tree, initialised like PyTorch's `nn.Linear`."""
    params: Params = {}
    for name, key in zip(LAYERS, jax.random.split(key, len(LAYERS))):
        fan_in, fan_out = LAYERS[name]
        init = uniform_fan_in_init(fan_in)
        k_kernel, k_bias = jax.random.split(key)
        params[name] = {"kernel": init(k_kernel, (fan_in, fan_out)), "bias": init(k_bias, (fan_out,))}
    return params


# -- pure JAX ------------------------------------------------------------------
def check_batch(inputs, targets) -> None:
    """ValueError unless inputs are (batch, 10) and targets (batch, 1)."""
    x_shape, y_shape = np.shape(inputs), np.shape(targets)
    if len(x_shape) != 2 or x_shape[1] != IN_FEATURES:
        raise ValueError(f"inputs must have shape (batch, {IN_FEATURES}), got {x_shape}")
    if y_shape != (x_shape[0], OUT_FEATURES):
        raise ValueError(f"targets must have shape ({x_shape[0]}, {OUT_FEATURES}) to match "
                         f"inputs {x_shape}, got {y_shape}")


def forward(params: Params, inputs: jax.Array) -> jax.Array:
    """Probabilities (batch, 1): sigmoid(fc2(relu(fc1(inputs))))."""
    hidden = jax.nn.relu(dense(params["fc1"], inputs))
    return jax.nn.sigmoid(dense(params["fc2"], hidden))


def loss_fn(params: Params, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    return binary_cross_entropy(forward(params, inputs), targets)


def make_train_step(optimizer: optax.GradientTransformation):
    """A jitted `step(params, opt_state, inputs, targets) -> (params, opt_state, loss, grads)`."""

    @jax.jit
    def step(params, opt_state, inputs, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, inputs, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    return step


def train(params: Params, inputs, targets, steps: int = 1,
          lr: float = LEARNING_RATE) -> list[StepRecord]:
    """`steps` full-batch SGD steps from `params`, with pure functions and optax."""
    check_batch(inputs, targets)
    optimizer, step = _sgd_and_step(lr)
    opt_state = optimizer.init(params)
    records = []
    for _ in range(steps):
        params, opt_state, loss, grads = step(params, opt_state, inputs, targets)
        records.append(_record(loss, grads, params))
    return records


@functools.lru_cache(maxsize=8)
def _sgd_and_step(lr: float):
    """optax SGD and its compiled step, kept per learning rate so repeated runs reuse them."""
    optimizer = optax.sgd(lr)
    return optimizer, make_train_step(optimizer)


# -- Flax NNX --------------------------------------------------------------------
class SimpleNet(nnx.Module):
    """The same network as a class, the way it is written with PyTorch's `nn.Module`."""

    def __init__(self, *, rngs: nnx.Rngs):
        def linear(fan_in, fan_out):
            init = uniform_fan_in_init(fan_in)
            return nnx.Linear(fan_in, fan_out, kernel_init=init, bias_init=init, rngs=rngs)

        self.fc1 = linear(*LAYERS["fc1"])
        self.fc2 = linear(*LAYERS["fc2"])

    def __call__(self, inputs: jax.Array) -> jax.Array:
        return nnx.sigmoid(self.fc2(nnx.relu(self.fc1(inputs))))


def nnx_from_params(params: Params) -> SimpleNet:
    """A `SimpleNet` holding the values of a parameter tree."""
    model = SimpleNet(rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    return model


def params_from_nnx(model: SimpleNet) -> Params:
    """The parameter tree of a `SimpleNet` (same layout as `init_params`)."""
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@nnx.jit
def _nnx_step(model: SimpleNet, optimizer: nnx.Optimizer, inputs, targets):
    def loss_of(model):
        return binary_cross_entropy(model(inputs), targets)

    loss, grads = nnx.value_and_grad(loss_of)(model)
    optimizer.update(model, grads)
    return loss, grads


def train_nnx(model: SimpleNet, inputs, targets, steps: int = 1,
              lr: float = LEARNING_RATE) -> list[StepRecord]:
    """`steps` SGD steps on `model` in place, with `nnx.Optimizer`."""
    check_batch(inputs, targets)
    optimizer = nnx.Optimizer(model, optax.sgd(lr), wrt=nnx.Param)
    inputs, targets = jnp.asarray(inputs), jnp.asarray(targets)
    records = []
    for _ in range(steps):
        loss, grads = _nnx_step(model, optimizer, inputs, targets)
        records.append(_record(loss, nnx.to_pure_dict(grads), params_from_nnx(model)))
    return records


# -- PyTorch ---------------------------------------------------------------------
def torch_net(params: Params):
    """The same network as a torch `nn.Module`, with the weights of `params` copied in."""
    import torch
    from torch import nn

    class TorchSimpleNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(IN_FEATURES, HIDDEN)
            self.fc2 = nn.Linear(HIDDEN, OUT_FEATURES)

        def forward(self, x):
            return torch.sigmoid(self.fc2(torch.relu(self.fc1(x))))

    net = TorchSimpleNet()
    with torch.no_grad():
        for name in LAYERS:
            layer = getattr(net, name)
            layer.weight.copy_(torch.tensor(np.asarray(params[name]["kernel"]).T))
            layer.bias.copy_(torch.tensor(np.asarray(params[name]["bias"])))
    return net


def torch_tree(net, attribute: str | None = None) -> Params:
    """The parameters of a torch net (or their `.grad` when `attribute="grad"`) in our layout."""
    tree: Params = {}
    for name in LAYERS:
        layer = getattr(net, name)
        weight, bias = layer.weight, layer.bias
        if attribute is not None:
            weight, bias = getattr(weight, attribute), getattr(bias, attribute)
        tree[name] = {"kernel": weight.detach().numpy().T.copy(), "bias": bias.detach().numpy().copy()}
    return tree


def train_torch(params: Params, inputs, targets, steps: int = 1,
                lr: float = LEARNING_RATE) -> list[StepRecord]:
    """`steps` SGD steps in PyTorch from a copy of `params`: zero_grad, backward, step."""
    import torch

    check_batch(inputs, targets)
    net = torch_net(params)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    criterion = torch.nn.BCELoss()
    x, y = torch.tensor(np.asarray(inputs)), torch.tensor(np.asarray(targets))
    records = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = criterion(net(x), y)
        loss.backward()
        grads = torch_tree(net, "grad")
        optimizer.step()
        records.append(StepRecord(loss.item(), grads, torch_tree(net)))
    return records


def max_difference(a: StepRecord, b: StepRecord) -> float:
    """Largest absolute difference between two records (loss, every gradient and parameter)."""
    leaves = jax.tree.leaves(jax.tree.map(lambda u, v: float(np.max(np.abs(u - v))),
                                          (a.grads, a.params), (b.grads, b.params)))
    return max([abs(a.loss - b.loss), *leaves])


def _record(loss, grads, params) -> StepRecord:
    as_numpy = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731
    return StepRecord(float(loss), as_numpy(grads), as_numpy(params))
