"""Shared test fixtures."""

import os
import subprocess
from pathlib import Path

import pytest


def _origin_checkout(repo: Path) -> Path | None:
    """The local repository this checkout was cloned from, if it was (`git clone .`)."""
    try:
        url = subprocess.run(["git", "-C", str(repo), "config", "--get", "remote.origin.url"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    url = url.removeprefix("file://")
    if not url or "://" in url or ":" in url.split("/")[0]:  # none, or a remote (https, ssh)
        return None
    path = Path(url)
    return path.resolve() if path.is_dir() else None


def _find_shared_data() -> Path:
    """$JAXLLM_SHARED_DATA, else `shared/data` in the nearest folder above the
    checkout that has one, else above the local checkout it was cloned from (a
    fresh `git clone . /tmp/x` reads the same data as its origin)."""
    if os.environ.get("JAXLLM_SHARED_DATA"):
        return Path(os.environ["JAXLLM_SHARED_DATA"])
    repo = Path(__file__).resolve().parents[1]
    origin = _origin_checkout(repo)
    for checkout in (repo, origin):
        for parent in checkout.parents if checkout else ():
            candidate = parent / "shared" / "data"
            if candidate.is_dir():
                return candidate
    return repo.parent / "shared" / "data"


SHARED_DATA = _find_shared_data()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared data folder beside the checkout (GPT-2 vocabulary, corpora)."""
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data folder not found at {SHARED_DATA}: the tokenizer and corpus "
                    f"tests read it from shared/data above the checkout (or above the one it was "
                    f"cloned from), or from "
                    f"$JAXLLM_SHARED_DATA")
    return SHARED_DATA


# The costly workers that fake several CPU devices, and the test modules that read
# them: they start in the background as soon as the tests are collected, so no
# xdist worker waits idle for one later.
DEVICE_WORKERS = {"sharding_worker.py": "test_sharding.py",
                  "finetune_mesh_worker.py": "test_finetune_mesh.py"}
REPO = Path(__file__).resolve().parents[1]
_STARTED: list = []  # the workers this process started (kept until it exits)


def _session_root(tmp_path_factory) -> Path:
    """A folder of this test session that every xdist worker shares (the
    workers' base folders sit in it); a run without xdist has its own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _worker_command(script: str, out: Path) -> tuple[list, dict]:
    import sys

    # The worker sets its device count in XLA_FLAGS itself, before importing JAX.
    env = dict(os.environ, PYTHONPATH=str(REPO), XLA_FLAGS="", JAX_PLATFORMS="cpu")
    return [sys.executable, str(REPO / "tests" / script), str(out)], env


def pytest_collection_finish(session):
    """Start the device workers the collected tests need, once per session:
    the first xdist worker here starts them (a lock orders the workers, and
    each passes here before its first test)."""
    import fcntl

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return  # one process: each fixture runs its worker when first asked
    files = {Path(str(item.fspath)).name for item in session.items}
    root = _session_root(session.config._tmp_path_factory)
    with open(root / "device_workers.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for script, module in DEVICE_WORKERS.items():
            stem = Path(script).stem
            if module not in files or (root / f"{stem}.started").exists():
                continue
            out = root / stem
            out.mkdir(exist_ok=True)
            command, env = _worker_command(script, out)
            # the shell writes the exit status last: its file says the worker ended
            _STARTED.append(subprocess.Popen(
                ["sh", "-c", 'timeout 600 "$@" >"$0.stdout" 2>"$0.stderr"; echo $? >"$0.rc"',
                 str(root / stem), *command], env=env, start_new_session=True))
            (root / f"{stem}.started").touch()


def pytest_sessionfinish(session, exitstatus):
    """Wait for the workers this process started (another xdist worker's tests
    may still read them); an interrupted session stops them instead."""
    import signal

    for proc in _STARTED:
        if exitstatus == pytest.ExitCode.INTERRUPTED and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()


def device_worker(tmp_path_factory, script: str) -> dict:
    """The JSON last line of `tests/<script>`, a worker that fakes several CPU
    devices (their count is fixed when JAX starts, so it runs in its own
    process), run once per test session: started at collection under xdist
    (`pytest_collection_finish`), else here, by the module fixture that
    asks."""
    import json
    import time

    root, stem = _session_root(tmp_path_factory), Path(script).stem
    if (root / f"{stem}.started").exists():
        rc, deadline = root / f"{stem}.rc", time.monotonic() + 900
        while not (rc.exists() and rc.read_text().strip()):
            assert time.monotonic() < deadline, f"{script} gave no exit status in 900 s"
            time.sleep(0.5)
        stderr = (root / f"{stem}.stderr").read_text()
        assert rc.read_text().strip() == "0", stderr[-4000:]
        return json.loads((root / f"{stem}.stdout").read_text().strip().splitlines()[-1])

    command, env = _worker_command(script, tmp_path_factory.mktemp(stem))
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
