"""One writer per run folder: an OS file lock held while a run trains.

Two runs writing checkpoints and metrics into one folder corrupt each other,
so a run takes `fcntl.flock` on `<run>/.lock` for as long as it trains. The
kernel drops the lock with the process, however it ends (kill -9 included),
so a lock is never stale. Readers (generate, classify, chat) take no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_NAME = ".lock"


class RunFolderBusy(RuntimeError):
    """Another process is training in this run folder."""


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike):
    """Hold the run folder's lock for the `with` block, or raise `RunFolderBusy`
    at once, naming the folder and the holder's process id."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RunFolderBusy(f"{run_dir} is in use by another run (process {holder}, lock "
                                f"{path}); wait for it to finish or choose another --out "
                                "folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        except BaseException:
            # a run that failed before writing anything leaves no folder behind
            if created and [p.name for p in run_dir.iterdir()] == [LOCK_NAME]:
                path.unlink()
                run_dir.rmdir()
            raise
    finally:
        os.close(fd)  # closing the descriptor releases the lock
