"""`make experiments` runs offline: `model` is skipped, with its reason, without the
GPT-2 vocabulary files, and the aggregate target lists every experiment."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_model_experiment_is_skipped_without_the_vocabulary(tmp_path):
    empty = tmp_path / "no-vocabulary"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "JAXLLM_GPT2_DIR"}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.model", "--tokenizer-dir", str(empty)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "model: skipped" in output
    # why: no vocabulary files in the folder asked for, and nothing is downloaded
    assert "no GPT-2 vocabulary files" in output
    assert "gpt2.tiktoken" in output and "encoder.json + vocab.bpe" in output
    assert str(empty) in output
    assert "downloads nothing" in output
    assert "--tokenizer-dir DIR" in output and "$JAXLLM_GPT2_DIR" in output
    # nothing of the GPT-2 124M work ran: no report was written, no table printed
    assert "Parameters per component" not in output
    assert "max |jaxllm" not in output


def test_make_experiments_lists_every_experiment():
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not on PATH")
    proc = subprocess.run([make, "-n", "experiments"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ("tensors", "autodiff", "backprop", "config", "model"):
        assert f"-m experiments.{name}" in proc.stdout, (name, proc.stdout)
