"""SimpleNet trained with SGD three ways (pure JAX + optax, Flax NNX, torch) from the same weights.

    python -m experiments.backprop    # writes results/backprop/results.{json,md}
"""

from __future__ import annotations

import jax

from experiments.common import markdown_table, write_report
from jaxllm.basics.backprop import (
    LEARNING_RATE,
    init_params,
    make_data,
    max_difference,
    nnx_from_params,
    train,
    train_nnx,
    train_torch,
)

STEPS = 5
BATCH = 8


def main() -> None:
    params = init_params(jax.random.key(0))
    inputs, targets = make_data(seed=0, batch=BATCH)
    runs = {
        "jax": train(params, inputs, targets, STEPS),
        "nnx": train_nnx(nnx_from_params(params), inputs, targets, STEPS),
        "torch": train_torch(params, inputs, targets, STEPS),
    }
    rows = []
    for i in range(STEPS):
        j, n, t = (runs[k][i] for k in ("jax", "nnx", "torch"))
        rows.append({"step": i + 1, "loss_jax": j.loss, "loss_nnx": n.loss, "loss_torch": t.loss,
                     "max_diff_jax_vs_torch": max_difference(j, t),
                     "max_diff_nnx_vs_torch": max_difference(n, t),
                     "max_diff_jax_vs_nnx": max_difference(j, n)})
    table = markdown_table(
        ["step", "loss JAX", "loss NNX", "loss torch", "max abs diff JAX vs torch",
         "max abs diff NNX vs torch", "max abs diff JAX vs NNX"],
        [(r["step"], f"{r['loss_jax']:.7f}", f"{r['loss_nnx']:.7f}", f"{r['loss_torch']:.7f}",
          f"{r['max_diff_jax_vs_torch']:.1e}", f"{r['max_diff_nnx_vs_torch']:.1e}",
          f"{r['max_diff_jax_vs_nnx']:.1e}") for r in rows],
    )
    markdown = (
        "# Backprop: SimpleNet (10 -> 5 -> 1), BCE, SGD\n\n"
        f"Batch of {BATCH}, learning rate {LEARNING_RATE}, {STEPS} full-batch steps from the same "
        "weights. Each difference is the largest over the loss, every gradient and every updated "
        "parameter at that step.\n\n" + table
    )
    write_report("backprop", {"steps": STEPS, "batch": BATCH, "lr": LEARNING_RATE, "per_step": rows},
                 markdown)


if __name__ == "__main__":
    main()
