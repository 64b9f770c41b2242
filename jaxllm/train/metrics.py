"""The run's metrics log: one JSON object per line in `metrics.jsonl`.

Training records: `{"kind": "train", "step", "tokens", "loss", "grad_norm", "lr"}`;
evaluation records: `{"kind": "eval", "step", "tokens", "train_loss", "val_loss",
"val_perplexity", "sample_greedy", "sample_temperature"}`. `step` counts
optimizer steps done (0 is the untrained model).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Append-only JSON-lines log in `run_dir`.

    With `write=False` (every process but the first in a multi-host run) the
    records stay in memory and nothing touches the shared run folder.
    """

    def __init__(self, run_dir: str | os.PathLike, *, write: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.write = write
        self._memory: list[dict[str, Any]] = []

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        if not self.write:
            self._memory.extend(records)
            return
        with open(self.path, "a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.write:
            return list(self._memory)
        if not self.path.exists():
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def clear(self) -> None:
        """Start afresh: a new run drops the metrics of an earlier, unsaved one."""
        self._memory = []
        if self.write:
            self.path.unlink(missing_ok=True)

    def truncate_after(self, step: int) -> None:
        """Drop the records past `step`: a resumed run rewrites them."""
        kept = [r for r in self.read() if r["step"] <= step]
        if not self.write:
            self._memory = kept
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)


def write_samples(records: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """The text samples of the eval records, step by step, as plain text."""
    lines = []
    for r in records:
        if r.get("kind") != "eval" or "sample_greedy" not in r:
            continue
        lines.append(f"== step {r['step']} ({r['tokens']:,} tokens, val loss {r['val_loss']:.3f})")
        lines.append(f"-- greedy:\n{r['sample_greedy']}")
        if "sample_temperature" in r:
            lines.append(f"-- temperature {r['temperature']}:\n{r['sample_temperature']}")
        lines.append("")
    Path(path).write_text("\n".join(lines) + "\n")
