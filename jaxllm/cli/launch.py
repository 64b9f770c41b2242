"""`jaxllm launch`: several processes of one jaxllm command on this machine.

    jaxllm launch --processes 2 --devices-per-process 2 -- pretrain --mesh data=2,fsdp=2 ...

starts N copies of `python -m jaxllm COMMAND ...` (or of `python SCRIPT.py ...`,
for a script of one's own that calls `jaxllm.sharding.initialize_distributed()`
first), each told the coordinator
(127.0.0.1 and a free port), the process count and its own id through the
environment variables `jaxllm.sharding.initialize_distributed` reads, and
`pretrain` gets `--distributed`. On the CPU each process fakes
`--devices-per-process` devices and JAX's collectives run over gloo, so a
multi-host run can be tried on one machine. When a process fails, the
launcher stops the others and exits non-zero naming it. SIGINT or SIGTERM to
the launcher is passed on to every process as SIGTERM: each saves a
checkpoint at one agreed step and ends (`jaxllm.interrupt`); the launcher
waits for them (SIGKILL after `STOP_GRACE_S`) and exits 130 or 143. On real hosts, run the
same command on each with the same three variables set by hand (or leave them
to SLURM / Open MPI detection, which is JAX's own).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time

from jaxllm import interrupt
from jaxllm.sharding import ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID

GRACE_S = 10.0  # after a failure, how long the others get to exit before SIGKILL
STOP_GRACE_S = interrupt.GRACE_S + 10.0  # on a stop: time to save a checkpoint first


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--processes", type=int, required=True, metavar="N",
                        help="number of processes to start")
    parser.add_argument("--devices-per-process", type=int, default=None, metavar="K",
                        help="CPU devices each process fakes (XLA's host device count; "
                             "default: as XLA_FLAGS says, else 1)")
    parser.add_argument("--port", type=int, default=None,
                        help="coordinator port on 127.0.0.1 (default: a free one)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="-- then the jaxllm command (or a .py script) and its arguments")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(base: dict, coordinator: str, n: int, i: int, devices: int | None) -> dict:
    """The environment of process `i` of `n`."""
    env = dict(base, **{ENV_COORDINATOR: coordinator, ENV_NUM_PROCESSES: str(n),
                        ENV_PROCESS_ID: str(i)})
    if devices is not None:
        flags = [f for f in env.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count")]
        env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    return env


def run(args) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise SystemExit("jaxllm launch: give the command after --, e.g. "
                         "jaxllm launch --processes 2 -- pretrain --mesh fsdp=-1")
    if args.processes < 1:
        raise SystemExit(f"jaxllm launch: --processes must be positive, got {args.processes}")
    if args.devices_per_process is not None and args.devices_per_process < 1:
        raise SystemExit("jaxllm launch: --devices-per-process must be positive, got "
                         f"{args.devices_per_process}")
    if command[0] == "pretrain" and "--distributed" not in command:
        command = [command[0], "--distributed", *command[1:]]
    coordinator = f"127.0.0.1:{args.port or free_port()}"
    procs = []
    # A SIGINT or SIGTERM to the launcher is passed on to every process, which
    # saves and stops (jaxllm.interrupt); the launcher waits for them, bounded.
    with interrupt.deferred(grace_s=STOP_GRACE_S + 10):
        for i in range(args.processes):
            if interrupt.requested():
                break
            env = process_env(os.environ, coordinator, args.processes, i,
                              args.devices_per_process)
            argv = command if command[0].endswith(".py") else ["-m", "jaxllm", *command]
            procs.append(subprocess.Popen([sys.executable, *argv], env=env))
            print(f"jaxllm launch: process {i} is pid {procs[-1].pid}", file=sys.stderr,
                  flush=True)
        return _wait(procs)


def _wait(procs) -> int:
    while True:
        signum = interrupt.requested()
        if signum:
            _stop(procs, STOP_GRACE_S)
            print(f"jaxllm launch: stopped by {interrupt.signal_name(signum)}; passed on to "
                  f"the {len(procs)} processes, all ended", file=sys.stderr, flush=True)
            return interrupt.exit_code(signum)
        codes = [p.poll() for p in procs]
        failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            i, code = failed[0]
            stopped = {interrupt.exit_code(s): s for s in interrupt.SIGNALS}.get(code)
            how = (f"signal {-code}" if code < 0 else f"exit code {code}" if stopped is None
                   else f"a stop on {interrupt.signal_name(stopped)}")
            print(f"jaxllm launch: process {i} (pid {procs[i].pid}) "
                  + ("ended with" if stopped else "failed with") + f" {how}; stopping the others",
                  file=sys.stderr, flush=True)
            _stop(procs, STOP_GRACE_S if stopped else GRACE_S)
            return code if stopped else 1
        if all(c == 0 for c in codes):
            return 0
        time.sleep(0.2)


def _stop(procs, grace_s: float) -> None:
    """SIGTERM to the processes still running; SIGKILL to those alive `grace_s` later."""
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
