"""`jaxllm parity`: every cross-check against PyTorch and transformers, as a report.

Writes results.md and results.json (default `results/parity/`, or under
$JAXLLM_RESULTS) with one row per comparison: the largest difference and its
tolerance. Exits 1 if a check fails, 2 on bad arguments or without PyTorch.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("patterns", nargs="*", metavar="CHECK",
                        help="run only the checks whose name or area matches (a word such as "
                             "'gpt2' or 'lora', or a shell pattern); all by default")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for results.md and results.json "
                             "(default: $JAXLLM_RESULTS/parity, else results/parity)")
    parser.add_argument("--list", action="store_true", help="list the checks and exit")


def run(args: argparse.Namespace) -> int:
    from jaxllm import parity

    try:
        checks = parity.select(args.patterns)
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in ("torch", "transformers"):
            raise
        print(f"jaxllm parity: the cross-checks need PyTorch and transformers ({e.name} "
              f"is missing): pip install 'jaxllm[test]'", file=sys.stderr)
        return 2
    if not checks:
        print(f"jaxllm parity: no check matches {' '.join(args.patterns)!r} "
              f"(jaxllm parity --list names them)", file=sys.stderr)
        return 2
    if args.list:
        for check in checks:
            print(check.name)
        return 0
    out = args.out or Path(os.environ.get("JAXLLM_RESULTS", "results")) / "parity"
    if out.exists() and not out.is_dir():
        print(f"jaxllm parity: --out {out} is a file, not a folder", file=sys.stderr)
        return 2

    def progress(o: parity.Outcome) -> None:
        status = "ok" if o.passed else "FAILED"
        print(f"{status:6} {o.check} ({o.seconds:.1f} s)", flush=True)
        for c in o.comparisons:
            if not c.passed:
                print(f"       {c.describe()}", flush=True)
        if o.error:
            print(f"       {o.error}", flush=True)

    start = time.perf_counter()
    outcomes = parity.run_checks(checks, progress)
    try:
        md, js = parity.write_report(outcomes, out)
    except OSError as e:
        print(f"jaxllm parity: cannot write the report to {out}: {e.strerror or e}",
              file=sys.stderr)
        return 2
    failed = [o.check for o in outcomes if not o.passed]
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} checks passed in "
          f"{time.perf_counter() - start:.0f} s; wrote {md} and {js}")
    if failed:
        print("failed: " + "; ".join(failed), file=sys.stderr)
    return 1 if failed else 0
