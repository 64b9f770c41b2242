"""The README's code runs as written.

Every ```python block of README.md is executed, in order, in one namespace, in
a fresh Python process (two fake CPU devices, so that the sharded step splits
its batch; and no state shared with this test process). Blocks that are not
meant to run are marked ```bash.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

_FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)

# Runs the blocks, then reports a few of the names they defined.
_DRIVER = r"""
import json, sys, warnings
blocks = json.load(sys.stdin)
namespace = {"__name__": "__readme__"}
for i, (line, code) in enumerate(blocks):
    exec(compile("\n" * (line - 1) + code, "README.md", "exec"), namespace)
import numpy as np
import jax
report = {
    "loss": float(namespace["loss"]),
    "vocab_size": namespace["config"].vocab_size,
    "logits_shape": list(namespace["logits"].shape),
    "metrics": {k: float(v) for k, v in namespace["metrics"].items()},
    "val_loss": float(namespace["val_loss"]),
    "devices": jax.device_count(),
}
print("README-REPORT " + json.dumps(report))
"""


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of every ```python block, in order."""
    return [(text.count("\n", 0, m.start(2)) + 1, m.group(2))
            for m in _FENCE.finditer(text) if m.group(1) == "python"]


def test_blocks_are_found_and_every_fence_is_labelled():
    text = README.read_text()
    blocks = python_blocks(text)
    assert len(blocks) >= 6, "the functional API and the recipes are python blocks"
    # an unlabelled fence would be skipped silently: say what it is (python, bash, text)
    assert all(m.group(1) for m in _FENCE.finditer(text)), "a ``` block has no language"


def test_readme_python_blocks_run_in_order():
    blocks = python_blocks(README.read_text())
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                          " --xla_force_host_platform_device_count=2").strip())
    done = subprocess.run([sys.executable, "-c", _DRIVER], input=json.dumps(blocks),
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    # what the README shows its blocks print (the loss to the digits every CPU gives)
    printed = done.stdout.splitlines()
    assert "198,144 of 841,088 parameters train" in printed, done.stdout
    assert any(re.fullmatch(r"step 4: loss 5\.2\d\d", x) for x in printed), done.stdout
    one_loop = [x for x in printed if x.startswith("step 4: val perplexity ")]
    assert one_loop and 100 < float(one_loop[0].split()[-1]) < 300, done.stdout
    assert "# 198,144 of 841,088 parameters train" in README.read_text()
    assert "reuse_host_memory" not in done.stderr, done.stderr[-4000:]  # called in time
    line = [x for x in done.stdout.splitlines() if x.startswith("README-REPORT ")][-1]
    report = json.loads(line.removeprefix("README-REPORT "))
    assert report["devices"] == 2
    assert report["logits_shape"] == [4, 64, report["vocab_size"]]
    assert abs(report["loss"] - 5.55) < 0.2  # near ln 257 at initialisation
    assert 0.0 < report["val_loss"] < 10.0
    metrics = report["metrics"]
    assert set(metrics) >= {"loss", "count", "grad_norm", "lr"}
    assert 0.0 < metrics["loss"] < 10.0 and metrics["grad_norm"] > 0.0
