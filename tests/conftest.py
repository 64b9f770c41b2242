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


def once_per_session(tmp_path_factory, name: str, compute):
    """`compute()`'s JSON-able result, computed by one pytest-xdist worker for all
    of them (the others wait for it and read it): a module fixture that runs a
    costly subprocess, the 8-device worker say, is then built once per test
    session, not once per worker whose share of the module's tests needs it."""
    import fcntl
    import json

    root = tmp_path_factory.getbasetemp().parent  # the workers' common folder
    path = root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return json.loads(path.read_text())
        result = compute()
        path.write_text(json.dumps(result))
        return result


def device_worker(tmp_path_factory, script: str) -> dict:
    """The JSON last line of `tests/<script>`, a worker that fakes several CPU
    devices (their count is fixed when JAX starts, so it runs in its own
    process), run once per test session (`once_per_session`)."""
    import json
    import sys

    repo = Path(__file__).resolve().parents[1]

    def run() -> dict:
        out = tmp_path_factory.mktemp(Path(script).stem)
        # The worker sets its device count in XLA_FLAGS itself, before importing JAX.
        env = dict(os.environ, PYTHONPATH=str(repo), XLA_FLAGS="", JAX_PLATFORMS="cpu")
        proc = subprocess.run([sys.executable, str(repo / "tests" / script), str(out)], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return once_per_session(tmp_path_factory, Path(script).stem, run)
