"""One neuron's gradients four ways: jax.grad, the chain rule by hand, finite differences, torch.

    python -m experiments.autodiff    # writes results/autodiff/results.{json,md}
"""

from __future__ import annotations

from experiments.common import markdown_table, write_report
from jaxllm.basics.autodiff import SEED_EXAMPLE, all_gradients, grad_jax, max_difference

VECTOR_EXAMPLE = {"x": [1.1, 0.5, -0.3], "y": 0.0, "w": [2.2, -1.0, 0.4], "b": 0.1}


def report(example: dict) -> tuple[list[dict], str]:
    results = {"jax.grad (float32)": grad_jax(**example)}
    for name, g in all_gradients(**example).items():
        results["jax.grad (float64)" if name == "jax.grad" else name] = g
    reference = results["torch autograd"]
    rows = [{"method": name, "loss": g.loss, "dL/dw": g.w.tolist(), "dL/db": g.b,
             "max |diff| vs torch": max_difference(g, reference)} for name, g in results.items()]

    def fmt(value):
        if isinstance(value, list):
            return "[" + ", ".join(f"{v:.6f}" for v in value) + "]"
        return f"{value:.6f}"

    table = markdown_table(
        ["method", "loss", "dL/dw", "dL/db", "max abs diff vs torch"],
        [(r["method"], fmt(r["loss"]), fmt(r["dL/dw"]), fmt(r["dL/db"]),
          f"{r['max |diff| vs torch']:.1e}") for r in rows],
    )
    return rows, table


def main() -> None:
    seed_rows, seed_table = report(SEED_EXAMPLE)
    vector_rows, vector_table = report(VECTOR_EXAMPLE)
    e = SEED_EXAMPLE
    markdown = (
        "# Autodiff: one neuron, four ways\n\n"
        f"z = x*w + b, a = sigmoid(z), L = BCE(a, y) with x={e['x']}, y={e['y']}, "
        f"w={e['w']}, b={e['b']}. JAX computes in float32 by default; the other rows are float64.\n\n"
        f"{seed_table}\n## Vector input\n\nz = sum(x * w) + b with {VECTOR_EXAMPLE}\n\n{vector_table}"
    )
    write_report("autodiff", {"seed_example": {"inputs": SEED_EXAMPLE, "methods": seed_rows},
                              "vector_example": {"inputs": VECTOR_EXAMPLE, "methods": vector_rows}},
                 markdown)


if __name__ == "__main__":
    main()
