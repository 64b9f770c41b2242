"""The neuron's gradients: jax.grad, the chain rule by hand, finite differences, torch."""

import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxllm.basics.autodiff import (
    METHODS,
    SEED_EXAMPLE,
    all_gradients,
    grad_by_hand,
    grad_jax,
    max_difference,
    neuron_loss,
)
from jaxllm.parity import assert_passed
from jaxllm.parity.basics import neuron_gradients

VECTOR_EXAMPLE = {"x": [1.1, 0.5, -0.3], "y": 0.0, "w": [2.2, -1.0, 0.4], "b": 0.1}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_seed_example_gradients_to_four_decimals(name):
    g = METHODS[name](**SEED_EXAMPLE)
    assert round(float(g.w), 4) == -0.0898
    assert round(g.b, 4) == -0.0817


@pytest.mark.parametrize("example", [SEED_EXAMPLE, VECTOR_EXAMPLE], ids=["scalar", "vector"])
def test_four_methods_agree(example):
    results = all_gradients(**example)
    assert set(results) == {"jax.grad", "by hand", "finite difference", "torch autograd"}
    reference = results["torch autograd"]
    assert np.shape(reference.w) == np.shape(example["w"])
    # the comparisons `jaxllm parity` reports: each method against torch autograd;
    # exact formulas in float64 agree far more tightly than finite differences can
    comparisons = assert_passed(neuron_gradients(example))
    assert {c.quantity: c.tolerance for c in comparisons} == {
        "jax.grad vs torch autograd": 1e-12, "by hand vs torch autograd": 1e-12,
        "finite difference vs torch autograd": 1e-6}
    for c, name in zip(comparisons, ("jax.grad", "by hand", "finite difference")):
        assert c.difference == max_difference(results[name], reference), name


def test_sigmoid_cross_entropy_gradient_is_prediction_minus_target():
    # dL/dz = a - y, so dL/db = a - y and dL/dw = (a - y) * x.
    x, y, w, b = np.array([0.3, -2.0]), 1.0, np.array([1.5, 0.25]), -0.2
    a = 1.0 / (1.0 + np.exp(-(x @ w + b)))
    g = grad_by_hand(x, y, w, b)
    np.testing.assert_allclose(g.b, a - y, rtol=1e-12)
    np.testing.assert_allclose(g.w, (a - y) * x, rtol=1e-12)
    np.testing.assert_allclose(g.loss, -np.log(a), rtol=1e-12)


def test_jax_float32_by_default_and_float64_without_touching_the_global_flag():
    assert not jax.config.jax_enable_x64
    g32 = grad_jax(**VECTOR_EXAMPLE)
    g64 = grad_jax(**VECTOR_EXAMPLE, float64=True)
    assert not jax.config.jax_enable_x64
    exact = grad_by_hand(**VECTOR_EXAMPLE)
    # float32 carries about 7 significant digits; float64 about 16.
    assert 1e-9 < max_difference(g32, exact) < 1e-5
    assert max_difference(g64, exact) < 1e-12


def test_loss_is_differentiable_under_jit():
    import jax.numpy as jnp

    w, b, x, y = jnp.float32(2.2), jnp.float32(0.0), jnp.float32(1.1), jnp.float32(1.0)
    dw, db = jax.jit(jax.grad(neuron_loss, argnums=(0, 1)))(w, b, x, y)
    assert abs(float(dw) - float(grad_by_hand(1.1, 1.0, 2.2, 0.0).w)) < 1e-6


@pytest.mark.parametrize("name", sorted(METHODS))
def test_mismatched_shapes_raise_naming_the_shapes(name):
    with pytest.raises(ValueError, match=r"x \(3,\) and w \(2,\)"):
        METHODS[name](x=[1.0, 2.0, 3.0], y=1.0, w=[0.5, 0.5], b=0.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"x": 1.0, "y": 1.0, "w": [1.0, 2.0], "b": 0.0}, r"x \(\) and w \(2,\)"),
        ({"x": [[1.0]], "y": 1.0, "w": [[1.0]], "b": 0.0}, r"scalars or vectors.*\(1, 1\)"),
        ({"x": 1.0, "y": 1.0, "w": 1.0, "b": [0.0, 0.0]}, r"b \(2,\)"),
        ({"x": 1.0, "y": [1.0, 0.0], "w": 1.0, "b": 0.0}, r"y \(2,\)"),
        ({"x": 1.0, "y": 1.5, "w": 1.0, "b": 0.0}, r"y must be in \[0, 1\], got 1.5"),
    ],
)
def test_bad_inputs_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        grad_jax(**kwargs)


def test_basics_do_not_import_torch():
    code = "import sys, jaxllm.basics; assert 'torch' not in sys.modules, 'torch was imported'"
    repo_root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=repo_root)
