"""Full DPO against LoRA DPO: steps/s and peak memory, in one run.

    python -m experiments.bench_dpo                          # GPT-2 124M shape, batch 4, 128 tokens
    python -m experiments.bench_dpo --batch 2 --seq 64 --steps 2
    python -m experiments.bench_dpo --mode lora              # one mode (what each child runs)

Both modes train the same random GPT-2 (tied head, dropout 0) on the same
preference batches of the shared data (GPT-2 tokens, the default collate, rows
cut to `--seq`), with `dpo_task` (beta 0.1, mean log-probabilities) and the
engine's AdamW. LoRA (rank 8, every dense layer of the blocks) trains only the
adapters, and its reference is the same weights with the adapters off. Each
mode runs in its own process so that its peak RSS (`ru_maxrss`) is its own;
reported: the one reference pass, compile time, step times (median), steps/s,
peak RSS, the device's peak bytes where the backend counts them (GPUs), live
buffers after the steps and XLA's temporary bytes for the step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = {"full": None, "lora": 8}


def measure(mode: str, batch: int, seq: int, steps: int, data: str) -> dict:
    import jax

    from jaxllm import lora
    from jaxllm.config import GPT_CONFIG_124M
    from jaxllm.data.preferences import PreferenceBatches, read_preferences, tokenize_pairs
    from jaxllm.finetune.dpo import dpo_task, reference_logprobs
    from jaxllm.finetune.dpo_run import peak_memory_bytes
    from jaxllm.model import init_params
    from jaxllm.tokenizer import get_tokenizer
    from jaxllm.train import TrainConfig, init_train_state, make_train_step
    from jaxllm.train.task import count_trainable

    config = GPT_CONFIG_124M.replace(tie_embeddings=True, drop_rate=0.0)
    tc = TrainConfig(lr=5e-6, weight_decay=0.01, batch_size=batch, total_steps=100,
                     warmup_steps=0, grad_clip=None)
    data = Path(data)
    tokenizer = get_tokenizer("gpt2", data)
    entries = read_preferences(data / "instruction-data-with-preference.json")[:batch * (steps + 1)]
    pairs = tokenize_pairs(entries, tokenizer)
    collate_kw = dict(allowed_max_length=seq, pad_multiple=seq)
    params = init_params(config, jax.random.key(0))
    rank, trainable = MODES[mode], None
    if rank is not None:
        params = lora.lora_params(params, config, jax.random.key(1), rank=rank, alpha=2 * rank)
        trainable = lora.TRAINABLE
    start = time.perf_counter()
    reference = reference_logprobs(params, config, pairs, batch, collate_kwargs=collate_kw)
    reference_s = time.perf_counter() - start
    batches = PreferenceBatches(pairs, batch, shuffle=False, collate_kwargs=collate_kw,
                                reference=reference)
    state = init_train_state(params, tc, trainable=trainable)
    del params
    step = make_train_step(config, tc, task=dpo_task(0.1, "mean"), trainable=trainable)
    first = batches.batch_at(0)
    start = time.perf_counter()
    compiled = step.lower(state, first).compile()
    compile_s = time.perf_counter() - start
    temp = getattr(compiled.memory_analysis(), "temp_size_in_bytes", None)
    times = []
    for k in range(steps):
        b = batches.batch_at(k)
        start = time.perf_counter()
        state, m = compiled(state, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"mode": mode, "trainable_params": count_trainable(state.params, trainable),
            "reference_pass_s": reference_s, "compile_s": compile_s, "step_s": times,
            "median_step_s": median, "steps_per_s": 1.0 / median, "xla_temp_bytes": temp,
            "live_bytes": sum(x.nbytes for x in jax.tree.leaves(state)),
            "losses": [float(m["loss"])], **peak_memory_bytes()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=sorted(MODES))
    parser.add_argument("--batch", type=int, default=4, help="preference pairs per step")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    parser.add_argument("--out", default="results/bench_dpo", help="result folder")
    parser.add_argument("--data-dir", default=os.environ.get("JAXLLM_SHARED_DATA") or next(
        (d for d in ("../shared/data", "../../shared/data") if os.path.isdir(d)), None),
        help="the shared data folder (GPT-2 vocabulary, the preference data)")
    args = parser.parse_args(argv)
    if args.mode:
        print(json.dumps(measure(args.mode, args.batch, args.seq, args.steps, args.data_dir)))
        return 0
    rows = []
    for mode in MODES:
        cmd = [sys.executable, "-m", "experiments.bench_dpo", "--mode", mode, "--batch",
               str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
               "--data-dir", str(args.data_dir)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"batch": args.batch, "seq": args.seq, "rows": rows}, f, indent=2)
    mb = lambda b: f"{b / 2**20:,.0f}" if b else "n/a"  # noqa: E731
    print("| mode | trainable params | reference pass s | step s (median) | steps/s | "
          "peak RSS MB | device peak MB | live MB | XLA temp MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['trainable_params']:,} | {r['reference_pass_s']:.1f} | "
              f"{r['median_step_s']:.2f} | {r['steps_per_s']:.3f} | "
              f"{mb(r['host_peak_rss_bytes'])} | {mb(r['device_peak_bytes'])} | "
              f"{mb(r['live_bytes'])} | {mb(r['xla_temp_bytes'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
