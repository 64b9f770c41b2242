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
from jaxllm.train.pretrain import LoopConfig, train

HOLD = """
import sys, time
from jaxllm.train.lock import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(120)
"""


def _hold(run):
    """A process holding `run`'s writer lock (it prints "locked" once it does)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


@pytest.fixture
def holder(tmp_path):
    run = tmp_path / "run"
    proc = _hold(run)
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


def test_generate_and_classify_read_a_run_while_it_trains(tmp_path, capsys):
    """Readers take no lock: a run folder whose writer holds the lock (a run
    still training) can be generated from and classified with, and the
    writer's lock is left as it was."""
    import jax

    from jaxllm.cli import main
    from jaxllm.finetune.classify import add_class_head
    from jaxllm.model import init_params
    from jaxllm.train import checkpoint, init_train_state

    config = get_preset("small").replace(n_layers=1, context_length=16, emb_dim=32, n_heads=2)
    params = init_params(config, jax.random.key(0))
    runs = {"lm": ({"kind": "pretrain"}, params),
            "clf": ({"kind": "classify", "classes": ["ham", "spam"], "max_length": 16,
                     "pad_id": 256, "classify": {"pooling": "last_token"}},
                    add_class_head(params, config, 2, jax.random.key(1)))}
    for name, (meta, tree) in runs.items():
        checkpoint.save(checkpoint.open_manager(tmp_path / name, create=True),
                        init_train_state(tree, TrainConfig()),
                        {"model": config.to_dict(), "tokenizer": "byte", **meta})
    holders = [_hold(tmp_path / name) for name in runs]
    try:
        assert main(["generate", "--run-dir", str(tmp_path / "lm"), "--prompt", "Hi",
                     "--max-new-tokens", "3"]) == 0
        assert capsys.readouterr().out.startswith("Hi")
        assert main(["classify", "--run-dir", str(tmp_path / "clf"), "--text", "free cash"]) == 0
        assert capsys.readouterr().out.split("\t")[0] in ("ham", "spam")
        for name, proc in zip(runs, holders):
            assert proc.poll() is None  # still training, still the holder
            assert (tmp_path / name / ".lock").read_text().strip() == str(proc.pid)
            with pytest.raises(RunFolderBusy):
                with run_lock(tmp_path / name):
                    pass
    finally:
        for proc in holders:
            proc.kill()
            proc.wait()
