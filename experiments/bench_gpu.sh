#!/usr/bin/env bash
# One short GPU check for an H100/H200, run from the repository root:
#   1. the speed levers equal the reference path (tests/test_levers.py, float32
#      matmuls at full precision; the cudnn attention case runs only here),
#   2. the GPU recipe end to end on a tiny config (bf16, torch.compile, fused AdamW),
#   3. the bf16 product rates, JAX and torch, of a large square product and of the
#      model's dense-layer shapes, with XLA's default GEMMs and with cuBLASLt,
#   4. GPT-2 124M, bf16 compute, fp32 master weights, context 1024: jaxllm vs
#      torch.compile at batch 32 (how MFU grows with the batch), then at the
#      issue's batch 16 with a per-op profile of jaxllm's step; that table is
#      printed last.
# PY picks the interpreter (default: python). A failing equality check is
# reported but does not stop the timing, so one call gives both answers.
set -uo pipefail
PY=${PY:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# JAX and PyTorch share the card in one process: keep JAX from taking 75% of it.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
JAX_DEFAULT_MATMUL_PRECISION=highest "$PY" -m pytest -q -p no:cacheprovider tests/test_levers.py \
    || echo "EQUALITY CHECKS FAILED (see above)"
"$PY" -m experiments.bench_train --device-check --steps 2 --repeats 2 > /dev/null \
    || echo "DEVICE CHECK FAILED"
for flags in "" "--xla_gpu_enable_cublaslt=true"; do
    echo "product rates, XLA_FLAGS='$flags':"
    XLA_FLAGS="$flags" "$PY" -m experiments.bench_train --gpu --products-only | grep -v "^machine" \
        || echo "PRODUCT RATES FAILED with XLA_FLAGS='$flags'"
done
"$PY" -m experiments.bench_train --gpu --steps 10 --repeats 5 --batch 32 \
    | grep -E "^(machine|matmul|  jaxllm)" || echo "BATCH 32 RUN FAILED"
"$PY" -m experiments.bench_train --gpu --steps 10 --repeats 5 --profile
