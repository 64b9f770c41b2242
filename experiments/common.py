"""What every experiment shares: where results go and how they are written.

Each experiment writes `results/<name>/results.json` and `results/<name>/results.md`
(`$JAXLLM_RESULTS` moves the root).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np


def results_dir(name: str) -> Path:
    path = Path(os.environ.get("JAXLLM_RESULTS", "results")) / name
    path.mkdir(parents=True, exist_ok=True)
    return path


def _plain(value: Any) -> Any:
    """Numpy/JAX scalars and arrays as JSON-friendly Python values."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist"):
        return np.asarray(value).tolist()
    return value


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_plain(data), indent=2) + "\n")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.6g}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_report(name: str, data: Any, markdown: str) -> Path:
    """Write results.json and results.md for experiment `name`, print the markdown."""
    out = results_dir(name)
    write_json(out / "results.json", data)
    (out / "results.md").write_text(markdown)
    print(markdown)
    print(f"wrote {out}/results.json and {out}/results.md")
    return out
