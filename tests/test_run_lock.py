"""One writer per run folder: a second run is refused at once; the lock dies with its process."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from jaxllm.config import get_preset
from jaxllm.tokenizer import ByteTokenizer
from jaxllm.train import TrainConfig
from jaxllm.train.lock import RunFolderBusy, run_lock
from jaxllm.train.loop import LoopConfig, train

HOLD = """
import sys, time
from jaxllm.train.lock import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield run, proc
    proc.kill()
    proc.wait()


def test_a_second_writer_is_refused_naming_the_folder_and_the_holder(holder):
    run, proc = holder
    with pytest.raises(RunFolderBusy, match=f"{run} is in use by another run \\(process {proc.pid}"):
        with run_lock(run):
            pass


def test_the_training_loop_refuses_a_busy_folder_before_writing(holder):
    run, _ = holder
    config = get_preset("small").replace(n_layers=1, context_length=16)
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(RunFolderBusy):
        train(run, config, TrainConfig(total_steps=2, batch_size=2), LoopConfig(),
              ByteTokenizer(), np.arange(200) % 250, progress=False)
    assert sorted(p.name for p in run.iterdir()) == before


def test_the_lock_dies_with_its_process_even_under_kill_9(holder):
    run, proc = holder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with run_lock(run):  # no stale lock
        assert (run / ".lock").read_text().strip() == str(os.getpid())


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path):
    run = tmp_path / "new"
    with pytest.raises(ValueError):
        with run_lock(run):
            raise ValueError("empty data")
    assert not run.exists()
