#!/usr/bin/env bash
# One prepared GPU run for an H100/H200 (issue 23), from the repository root:
#
#   bash experiments/bench_gpu.sh                  # MODE=main, the default: ~7 minutes
#   MODE=autotune bash experiments/bench_gpu.sh    # the max-autotune peer: ~5-7 minutes
#   MODE=flags bash experiments/bench_gpu.sh       # XLA flags one by one, jaxllm alone: ~6 minutes
#   MODE=qwen3 bash experiments/bench_gpu.sh       # Qwen3-0.6B training throughput: ~6-8 minutes
#
# Each mode fits in one device call of at most 8 minutes: every stage runs under
# `timeout` with what is left of DEADLINE_S (default 470 s) from the start, so a
# stage that overruns is cut and the next still reports. Output: one line per
# stage, then the table, printed last. Nothing stops at a failed check: a failure
# is printed (EQUALITY CHECKS FAILED, LOSSES DIFFER, PEER FAILED) and the timing goes on.
#
# MODE=main
#   1. equality: the speed levers equal the reference path (tests/test_levers.py,
#      float32 at full matmul precision; its cudnn case runs only on a GPU), and the
#      tiny device check (bf16, vocabulary 100 padded to 128, tied head): the eager
#      peer's first two losses against jaxllm's within bf16 tolerance (2e-2);
#   2. GPT-2 124M as published (tied head, qkv bias, vocabulary 50257 padded to
#      50304 on both sides), bf16 compute, float32 master weights, context 1024,
#      batch 16: jaxllm against the torch peers eager, compile (model + loss under
#      torch.compile) and compile-step (forward, backward, clip, AdamW in one compiled
#      function), each checked first (its first two losses within 2e-2 of jaxllm's),
#      then timed interleaved; then the same model untied against the compile peer;
#      a per-op profile of jaxllm's step for each. The table names the fastest peer,
#      the ratio's denominator, with the others beside it.
# MODE=autotune
#   the tied case against compile and max-autotune (torch.compile mode="max-autotune":
#   Triton GEMM autotuning and CUDA graphs, several minutes to compile). Off by
#   default because its compile does not fit beside MODE=main's in 8 minutes.
# MODE=qwen3
#   Qwen3-0.6B as published (tied head, GQA 16/8 heads of 128, q/k norm, vocabulary
#   151936), bf16 compute, float32 master weights, context 1024, batch 4: jaxllm
#   (cuDNN attention) against transformers' Qwen3ForCausalLM with the same weights,
#   SDPA (flash) attention under bf16 autocast and fused AdamW, eager, compiled
#   (torch.compile of the model) and with the whole step compiled; first two losses
#   checked within 2e-2, then timed interleaved.
# MODE=flags
#   jaxllm alone on the tied case, with XLA_FLAGS empty and then with each flag below
#   on its own (the single-device ones from the JAX GPU performance tips and NVIDIA's
#   JAX-Toolbox GPU performance page); a table of tokens/s against the baseline last.
#   A flag this jaxlib does not know makes its run fail, reported as such.
#
# PY picks the interpreter (default: python3, the one holding CUDA torch and JAX on the
# lent H200 image). Results: results/bench-gpu*/. From a session with a device:
#   run(command="bash experiments/bench_gpu.sh", timeout_s=540)
set -uo pipefail
PY=${PY:-$(command -v python3 || command -v python)}
MODE=${MODE:-main}
DEADLINE_S=${DEADLINE_S:-470}
STEPS=${STEPS:-10}
REPEATS=${REPEATS:-5}
XLA_FLAG_LIST=(
    "--xla_gpu_enable_latency_hiding_scheduler=true"
    "--xla_gpu_triton_gemm_any=true"
    "--xla_gpu_enable_cublaslt=true"
    "--xla_gpu_enable_command_buffer="
)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# JAX and PyTorch share the card in one process: keep JAX from taking 75% of it.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}
# The profile recompiles jaxllm's step for its HLO text: the persistent cache makes that a hit.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxllm-jax-cache}
START=$SECONDS

left() {  # seconds left before the deadline, at most $1, at least 1
    local n=$((DEADLINE_S - (SECONDS - START)))
    n=$((n < $1 ? n : $1))
    echo $((n > 1 ? n : 1))
}

stage() {  # stage CAP_S NAME COMMAND...: run under min(CAP_S, the deadline), say how it ended
    local cap=$1 name=$2 rc t0=$SECONDS
    shift 2
    echo "== $name (t=$((SECONDS - START)) s, $(left "$cap") s allowed)"
    timeout --kill-after=10 "$(left "$cap")" "$@"
    rc=$?
    if [ $rc -eq 124 ]; then echo "== $name: CUT AT THE DEADLINE after $((SECONDS - t0)) s"
    elif [ $rc -ne 0 ]; then echo "== $name: FAILED (exit $rc) after $((SECONDS - t0)) s"
    else echo "== $name: ok, $((SECONDS - t0)) s"; fi
    return $rc
}

BENCH=("$PY" -m experiments.bench_train --gpu --steps "$STEPS" --repeats "$REPEATS")

case $MODE in
main)
    stage 120 "lever tests" env JAX_DEFAULT_MATMUL_PRECISION=highest \
        "$PY" -m pytest -q -p no:cacheprovider tests/test_levers.py \
        || echo "EQUALITY CHECKS FAILED (lever tests, see above)"
    stage 90 "device check (tiny bf16, eager peer)" \
        "$PY" -m experiments.bench_train --device-check --steps 2 --repeats 2 --peers eager \
        | grep -E "^(  |LOSSES|PEER|==)" || echo "EQUALITY CHECKS FAILED (device check)"
    log=/tmp/bench-gpu-main.log
    stage 600 "GPT-2 124M tied and untied" "${BENCH[@]}" --case gpt2-124m --profile > "$log" 2>&1
    rc=$?
    # progress (first losses, compile times, tokens/s per case), then the profiles' top ops
    sed '/^# Training throughput/,$d' "$log" | grep -v "^machine" | tail -60
    sed -n '/^## Costliest/,/^wrote/p' "$log" | grep -v "^wrote" | head -70
    [ $rc -eq 0 ] || echo "MAIN RUN: exit $rc (LOSSES DIFFER / PEER FAILED / CUT: see above)"
    echo "== total $((SECONDS - START)) s; the table:"
    sed -n '/^# Training throughput/,/^## Costliest/p' "$log" | grep -vE "^(## Costliest|==|wrote)"
    ;;
autotune)
    log=/tmp/bench-gpu-autotune.log
    stage 600 "GPT-2 124M tied: compile and max-autotune" \
        "${BENCH[@]}" --case tied --peers compile,max-autotune --out bench-gpu-autotune > "$log" 2>&1
    sed '/^# Training throughput/,$d' "$log" | grep -v "^machine" | tail -40
    echo "== total $((SECONDS - START)) s; the table:"
    sed -n '/^# Training throughput/,$p' "$log" | grep -vE "^(==|wrote)"
    ;;
qwen3)
    log=/tmp/bench-gpu-qwen3.log
    stage 600 "Qwen3-0.6B: eager, compile and compile-step peers" \
        "${BENCH[@]}" --case qwen3 --out bench-gpu-qwen3 > "$log" 2>&1
    rc=$?
    sed '/^# Training throughput/,$d' "$log" | grep -v "^machine" | tail -40
    [ $rc -eq 0 ] || echo "QWEN3 RUN: exit $rc (LOSSES DIFFER / PEER FAILED / CUT: see above)"
    echo "== total $((SECONDS - START)) s; the table:"
    sed -n '/^# Training throughput/,$p' "$log" | grep -vE "^(==|wrote)"
    ;;
flags)
    rm -rf "${JAXLLM_RESULTS:-results}"/bench-gpu-flags-*
    i=0
    for flags in "" "${XLA_FLAG_LIST[@]}"; do
        stage 120 "jaxllm alone, XLA_FLAGS='$flags'" env XLA_FLAGS="$flags" \
            "${BENCH[@]}" --case tied --peers none --out "bench-gpu-flags-$i" \
            | grep -E "^(  jaxllm|==)" || echo "XLA_FLAGS='$flags': no result"
        i=$((i + 1))
    done
    echo "== total $((SECONDS - START)) s; the table:"
    "$PY" - "$i" <<'EOF'
import json, os, sys
from pathlib import Path
root = Path(os.environ.get("JAXLLM_RESULTS", "results"))
rows, base = [], None
for i in range(int(sys.argv[1])):
    path = root / f"bench-gpu-flags-{i}" / "results.json"
    if not path.exists():
        rows.append((f"run {i}", None, None))
        continue
    data = json.loads(path.read_text())
    r = data["results"][0]
    tps = r["jax_tokens_per_s"]
    base = tps if i == 0 else base
    rows.append((data["machine"]["xla_flags"] or "(none)", tps, r["mfu_measured"]["jax"]))
print("| XLA_FLAGS | jaxllm tok/s | MFU vs measured matmul | vs no flags |")
print("|---|---|---|---|")
for flags, tps, mfu in rows:
    if tps is None:
        print(f"| {flags} | failed | - | - |")
    else:
        print(f"| {flags} | {tps:.0f} | {100 * mfu:.1f}% | "
              + (f"{tps / base:.3f}x |" if base else "- |"))
EOF
    ;;
*)
    echo "MODE must be main, autotune, flags or qwen3, got '$MODE'" >&2
    exit 2
    ;;
esac
