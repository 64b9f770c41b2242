"""The seed's examples against PyTorch: tensors, one neuron's gradients, SimpleNet's SGD steps.

The examples themselves live in `jaxllm.basics` (and `make tensors autodiff
backprop` print them in full); these checks keep only the comparisons.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxllm.basics import autodiff as neuron, backprop as simplenet, tensors as tensor_examples
from jaxllm.parity import Comparison, exact, register, require, within

VECTOR_EXAMPLE = {"x": [1.1, 0.5, -0.3], "y": 0.0, "w": [2.2, -1.0, 0.4], "b": 0.1}
GRAD_ATOL = 1e-6  # finite differences (and float32) are good to about this
EXACT_ATOL = 1e-12  # formulas in float64
SGD_ATOL = 1e-6


@register("seed: tensors, every example in JAX and torch")
def tensors() -> list[Comparison]:
    """Every example of `jaxllm.basics.tensors`: the same values and shape in both libraries."""
    rows = tensor_examples.compare()
    require([r["name"] for r in rows] == [e.name for e in tensor_examples.EXAMPLES],
            "the comparison skipped an example")
    for r in rows:
        require(r["same_shape"], f"{r['name']}: shape {r['jax']['shape']} in JAX, "
                                 f"{r['torch']['shape']} in torch")
    return [exact(f"values of all {len(rows)} examples",
                  {r["name"]: (np.asarray(r["jax"]["values"], np.float64),
                               np.asarray(r["torch"]["values"], np.float64)) for r in rows})]


def _as_pairs(g: neuron.Gradients, ref: neuron.Gradients) -> dict:
    return {"loss": (g.loss, ref.loss), "dL/dw": (g.w, ref.w), "dL/db": (g.b, ref.b)}


@register("seed: one neuron's gradients four ways (vector)", example=VECTOR_EXAMPLE)
@register("seed: one neuron's gradients four ways (scalar)", example=neuron.SEED_EXAMPLE)
def neuron_gradients(example: dict) -> list[Comparison]:
    """jax.grad, the chain rule by hand and finite differences against torch autograd."""
    results = neuron.all_gradients(**example)
    require(set(results) == {"jax.grad", "by hand", "finite difference", "torch autograd"},
            f"the methods are {sorted(results)}")
    reference = results.pop("torch autograd")
    for name, g in results.items():
        require(np.shape(g.w) == np.shape(example["w"]), f"{name}: dL/dw has shape "
                                                         f"{np.shape(g.w)}")
    # Exact formulas in float64 agree far more tightly than finite differences can.
    return [within(f"{name} vs torch autograd", _as_pairs(g, reference),
                   GRAD_ATOL if name == "finite difference" else EXACT_ATOL)
            for name, g in results.items()]


def _tree_pairs(prefix: str, ours, theirs) -> dict:
    require(jax.tree.structure(ours) == jax.tree.structure(theirs),
            f"{prefix}: the trees differ in structure")
    return {f"{prefix}{jax.tree_util.keystr(p)}": (u, v) for (p, u), v in
            zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(theirs))}


@register("seed: SimpleNet, 5 SGD steps (JAX, Flax NNX, torch)", steps=5)
def sgd_steps(steps: int = 5) -> list[Comparison]:
    """SimpleNet trained with SGD from the same weights: pure JAX and Flax NNX
    against torch, every loss, gradient and updated parameter at every step."""
    params = simplenet.init_params(jax.random.key(0))
    inputs, targets = simplenet.make_data(seed=0, batch=8)
    runs = {"JAX": simplenet.train(params, inputs, targets, steps),
            "NNX": simplenet.train_nnx(simplenet.nnx_from_params(params), inputs, targets, steps),
            "torch": simplenet.train_torch(params, inputs, targets, steps)}
    require(all(len(r) == steps for r in runs.values()), "a trainer skipped steps")
    # The updates are large against the tolerance, so agreement is not trivial.
    moved = max(float(np.max(np.abs(a - b))) for a, b in
                zip(jax.tree.leaves(runs["JAX"][-1].params), jax.tree.leaves(params)))
    require(moved > 100 * SGD_ATOL, f"the steps moved the weights by {moved:.3g} only")
    out = []
    for ours, theirs in (("JAX", "torch"), ("NNX", "torch"), ("JAX", "NNX")):
        losses, grads, weights = {}, {}, {}
        for k, (a, b) in enumerate(zip(runs[ours], runs[theirs])):
            losses[f"step {k + 1}"] = (a.loss, b.loss)
            grads.update(_tree_pairs(f"step {k + 1} ", a.grads, b.grads))
            weights.update(_tree_pairs(f"step {k + 1} ", a.params, b.params))
        out += [within(f"{ours} vs {theirs}: loss", losses, SGD_ATOL),
                within(f"{ours} vs {theirs}: gradients", grads, SGD_ATOL),
                within(f"{ours} vs {theirs}: weights", weights, SGD_ATOL)]
    return out
