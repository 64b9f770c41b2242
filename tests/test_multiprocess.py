"""Several processes for real: `jaxllm launch` runs jax.distributed on this machine,
two processes of two CPU devices each, with gloo collectives."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxllm.train import checkpoint
from jaxllm.train.task import path_str

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multiprocess_worker.py"
PRETRAIN = ["pretrain", "--preset", "small", "--set", "context_length=32", "--set",
            "batch_size=8", "--set", "n_layers=2", "--set", "eval_batches=1", "--set",
            "sample_tokens=2", "--set", "temperature=0", "--eval-every", "4", "--quiet"]
TIMEOUT = 240


def jaxllm(args, *, devices=None, cwd=None, **kwargs):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("XLA_FLAGS", None)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.run([sys.executable, "-m", "jaxllm", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=TIMEOUT, **kwargs)


def launch(n, k, args, **kwargs):
    return jaxllm(["launch", "--processes", str(n), "--devices-per-process", str(k), "--", *args],
                  **kwargs)


def train_records(run):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same sharded run, data=2,fsdp=2: one process of 4 devices, and 2 x 2."""
    root = tmp_path_factory.mktemp("multiprocess")
    args = PRETRAIN + ["--steps", "4", "--save-every", "2", "--mesh", "data=2,fsdp=2"]
    single = jaxllm(args + ["--out", str(root / "single")], devices=4)
    assert single.returncode == 0, single.stderr[-3000:]
    double = launch(2, 2, args + ["--out", str(root / "double")])
    assert double.returncode == 0, double.stderr[-3000:]
    return root


def test_two_processes_give_the_single_process_losses(runs):
    single, double = train_records(runs / "single"), train_records(runs / "double")
    assert [r["step"] for r in double] == [1, 2, 3, 4]  # each step once: process 0 alone writes
    np.testing.assert_allclose([r["loss"] for r in double], [r["loss"] for r in single],
                               rtol=1e-5)
    assert (runs / "double" / "loss.png").exists()
    assert checkpoint.open_manager(runs / "double").all_steps() == [2, 4]


def restored(run, out, n, k, mesh):
    """The run's parameters restored onto `mesh` by n processes of k devices."""
    if n == 1:
        env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={k}",
                   PYTHONPATH=str(REPO))
        proc = subprocess.run([sys.executable, str(WORKER), str(run), mesh, str(out)], env=env,
                              capture_output=True, text=True, timeout=TIMEOUT)
    else:
        proc = launch(n, k, [str(WORKER), str(run), mesh, str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


def test_the_two_process_checkpoint_restores_onto_other_layouts(runs, tmp_path):
    params, _, _ = checkpoint.load_params(runs / "double")
    want = {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    one = restored(runs / "double", tmp_path / "one.npz", 1, 4, "fsdp=4")
    two = restored(runs / "double", tmp_path / "two.npz", 2, 2, "data=1,fsdp=4")
    assert (one.pop("processes"), one.pop("devices"), two.pop("processes"),
            two.pop("devices")) == (1, 4, 2, 4)
    for got in (one, two):
        assert got.keys() == want.keys()
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_a_killed_process_stops_the_run_and_leaves_a_restorable_checkpoint(tmp_path):
    run = tmp_path / "killed"
    args = PRETRAIN + ["--steps", "400", "--save-every", "2", "--mesh", "fsdp=4", "--out", str(run)]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "jaxllm", "launch", "--processes", "2",
                             "--devices-per-process", "2", "--", *args], env=env,
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    pids = {}
    while len(pids) < 2:
        m = re.match(r"jaxllm launch: process (\d) is pid (\d+)", proc.stderr.readline())
        if m:
            pids[int(m[1])] = int(m[2])
    deadline = time.monotonic() + TIMEOUT
    while not (run / "checkpoints" / "2").is_dir():
        assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint was written"
        time.sleep(0.2)
    killed_at = time.monotonic()
    os.kill(pids[1], 9)
    rest = proc.communicate(timeout=60)[1]
    assert proc.returncode == 1
    assert time.monotonic() - killed_at < 30
    assert f"process 1 (pid {pids[1]}) failed with signal 9" in rest
    params, config, _ = checkpoint.load_params(run)  # the last complete checkpoint
    assert config.n_layers == 2 and params["blocks"]
