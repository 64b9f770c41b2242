"""Tensors in JAX next to torch: each example's code, result and dtype in both libraries.

    python -m experiments.tensors    # writes results/tensors/results.{json,md}
"""

from __future__ import annotations

import json

from experiments.common import markdown_table, write_report
from jaxllm.basics.tensors import (
    DIFFERENCES,
    compare,
    default_int_dtypes,
    item_assignment,
    view_vs_reshape,
)


def main() -> None:
    rows = compare()
    table = markdown_table(
        ["example", "JAX", "torch", "value", "JAX dtype", "torch dtype", "same values"],
        [(r["name"], f"`{r['jax_code']}`", f"`{r['torch_code']}`",
          json.dumps(r["jax"]["values"]), r["jax"]["dtype"], r["torch"]["dtype"],
          "yes" if r["same_values"] and r["same_shape"] else "NO") for r in rows],
    )
    demos = {"default int dtype": default_int_dtypes(), "item assignment": item_assignment(),
             "view vs reshape": view_vs_reshape()}
    notes = "\n".join(f"- **{k}**: {v}" for k, v in DIFFERENCES.items())
    demo_lines = "\n".join(f"- {k}: `{json.dumps(v)}`" for k, v in demos.items())
    markdown = (f"# Tensors: JAX vs torch\n\n{table}\n## Where JAX differs on purpose\n\n{notes}\n\n"
                f"## Demonstrations\n\n{demo_lines}\n")
    write_report("tensors", {"examples": rows, "differences": DIFFERENCES, **demos}, markdown)


if __name__ == "__main__":
    main()
