"""SimpleNet trained with SGD: pure JAX, Flax NNX and PyTorch give the same numbers."""

import math

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from jaxllm.basics.backprop import (
    LAYERS,
    LEARNING_RATE,
    SimpleNet,
    forward,
    init_params,
    loss_fn,
    make_data,
    max_difference,
    nnx_from_params,
    params_from_nnx,
    torch_net,
    train,
    train_torch,
)
from jaxllm.parity import assert_passed
from jaxllm.parity.basics import sgd_steps

TOL = 1e-6


@pytest.fixture(scope="module")
def setup():
    return init_params(jax.random.key(0)), *make_data(seed=0, batch=8)


def assert_trees_close(a, b, tol=TOL):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.shape(u) == np.shape(v)
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=0, atol=tol)


def test_init_params_shapes_and_torch_style_bounds():
    params = init_params(jax.random.key(1))
    for name, (fan_in, fan_out) in LAYERS.items():
        assert params[name]["kernel"].shape == (fan_in, fan_out)
        assert params[name]["bias"].shape == (fan_out,)
        for leaf in params[name].values():
            assert 0 < float(np.max(np.abs(leaf))) <= 1 / math.sqrt(fan_in)


def test_nnx_model_init_has_the_same_layout_and_bounds():
    params = params_from_nnx(SimpleNet(rngs=nnx.Rngs(3)))
    assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, init_params(jax.random.key(0)))
    for name, (fan_in, _) in LAYERS.items():
        assert float(np.max(np.abs(params[name]["kernel"]))) <= 1 / math.sqrt(fan_in)


def test_nnx_round_trip_and_forward_match(setup):
    params, inputs, _ = setup
    model = nnx_from_params(params)
    assert_trees_close(params_from_nnx(model), params, tol=0)
    probs = forward(params, inputs)
    assert probs.shape == (8, 1) and bool(((probs > 0) & (probs < 1)).all())
    np.testing.assert_allclose(model(inputs), probs, rtol=0, atol=1e-7)


def test_torch_net_forward_and_loss_match(setup):
    params, inputs, targets = setup
    net = torch_net(params)
    with torch.no_grad():
        probs = net(torch.tensor(inputs)).numpy()
        loss = torch.nn.BCELoss()(torch.tensor(probs), torch.tensor(targets)).item()
    np.testing.assert_allclose(probs, forward(params, inputs), rtol=0, atol=TOL)
    assert abs(loss - float(loss_fn(params, inputs, targets))) < TOL


@pytest.mark.parametrize("steps", [1, 5])
def test_jax_nnx_and_torch_agree_step_by_step(setup, steps):
    # The check `jaxllm parity` reports: every loss, gradient and updated weight at
    # every step, JAX and NNX against torch and each other, each strictly below TOL
    # (which bounds max_difference too); it requires the steps to move the weights
    # by over 100 * TOL, so that agreement is not trivial.
    comparisons = assert_passed(sgd_steps(steps))
    assert len(comparisons) == 9 and all(c.tolerance == TOL for c in comparisons)
    params, inputs, targets = setup
    j, t = train(params, inputs, targets, steps)[-1], train_torch(params, inputs, targets, steps)[-1]
    assert max_difference(j, t) <= max(c.difference for c in comparisons[:3]) < TOL


def test_sgd_step_is_params_minus_lr_times_grads(setup):
    params, inputs, targets = setup
    first, second = train(params, inputs, targets, steps=2)
    expected = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, first.grads)
    assert_trees_close(first.params, expected, tol=1e-7)
    expected = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, first.params, second.grads)
    assert_trees_close(second.params, expected, tol=1e-7)


def test_loss_goes_down(setup):
    params, inputs, targets = setup
    losses = [r.loss for r in train(params, inputs, targets, steps=5, lr=0.5)]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


@pytest.mark.parametrize("trainer", [train, train_torch])
@pytest.mark.parametrize(
    "x_shape, y_shape, message",
    [((8, 9), (8, 1), r"inputs must have shape \(batch, 10\), got \(8, 9\)"),
     ((10,), (1,), r"got \(10,\)"),
     ((8, 10), (8,), r"targets must have shape \(8, 1\).*got \(8,\)")],
)
def test_bad_batch_shapes_raise(setup, trainer, x_shape, y_shape, message):
    params = setup[0]
    with pytest.raises(ValueError, match=message):
        trainer(params, np.zeros(x_shape, np.float32), np.zeros(y_shape, np.float32))
