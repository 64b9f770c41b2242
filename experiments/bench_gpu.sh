#!/usr/bin/env bash
# One short GPU check for an H100/H200, run from the repository root:
#   1. the speed levers equal the reference path (tests/test_levers.py; the
#      cudnn attention case runs only here),
#   2. the GPU recipe end to end on a tiny config (bf16, torch.compile, fused AdamW),
#   3. GPT-2 124M, bf16 compute, fp32 master weights, context 1024, batch 16:
#      jaxllm vs torch.compile; the table is printed last.
# PY picks the interpreter (default: python).
set -euo pipefail
PY=${PY:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m pytest -q tests/test_levers.py
"$PY" -m experiments.bench_train --device-check --steps 2 --repeats 2 > /dev/null
"$PY" -m experiments.bench_train --gpu --steps 10 --repeats 5 > /dev/null
cat "${JAXLLM_RESULTS:-results}/bench-gpu/results.md"
