"""LoRA against full fine-tuning: step time, peak memory, trainable parameters and
optimizer state, GPT-2 124M on this machine.

    python -m experiments.bench_lora                       # batch 8 x 128, full, LoRA r=8, r=16
    python -m experiments.bench_lora --batch 4 --seq 64 --steps 2
    python -m experiments.bench_lora --mode lora16         # one measurement (what each child runs)

Each mode's memory is measured in its own process, one after the other, so
that each peak RSS (the high-water mark, `ru_maxrss`) is that mode's alone: the same
base weights (GPT-2 124M, tied head, N(0, 0.02) init), the same batch, AdamW
from `make_optimizer`, the jitted `make_train_step`. LoRA adapts every dense
layer of the blocks (q, k, v split; the tied head is the embedding, not a
dense layer) and trains only the adapters (`trainable=jaxllm.lora.TRAINABLE`).
Reported per mode: compile time, peak RSS, the live device buffers after the
steps (parameters and optimizer state), XLA's temporary buffer bytes for the
step (its memory analysis: activations and gradients), trainable parameters
and optimizer-state bytes; then the step times, measured with the three modes
in one process, one step of each in turn (the machine is shared and drifts):
the median per mode, and the ratio to full fine-tuning as the median of each
round's own ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODES = {"full": None, "lora8": 8, "lora16": 16}


def build(mode: str, batch: int, seq: int):
    """(compiled step, state, batch, trainable params, optimizer-state bytes, compile s)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxllm import lora
    from jaxllm.config import GPT_CONFIG_124M
    from jaxllm.model import init_params
    from jaxllm.train import TrainConfig, init_train_state, make_train_step
    from jaxllm.train.task import count_trainable, lm_batch

    config = GPT_CONFIG_124M.replace(tie_embeddings=True, drop_rate=0.0)
    tc = TrainConfig(batch_size=batch, total_steps=100, warmup_steps=0)
    params = init_params(config, jax.random.key(0))
    rank, trainable = MODES[mode], None
    if rank is not None:
        params = lora.lora_params(params, config, jax.random.key(1), rank=rank, alpha=2 * rank)
        trainable = lora.TRAINABLE
    state = init_train_state(params, tc, trainable=trainable)
    del params
    opt_bytes = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
    n_train = count_trainable(state.params, trainable)
    data = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq + 1), np.int32)
    b = lm_batch(jnp.asarray(data[:, :-1]), jnp.asarray(data[:, 1:]))
    t0 = time.perf_counter()
    compiled = make_train_step(config, tc, trainable=trainable).lower(state, b).compile()
    return compiled, state, b, n_train, opt_bytes, time.perf_counter() - t0


def measure(mode: str, batch: int, seq: int, steps: int) -> dict:
    """One mode alone in this process: its memory, compile time, own step times."""
    import jax

    compiled, state, b, n_train, opt_bytes, compile_s = build(mode, batch, seq)
    temp = getattr(compiled.memory_analysis(), "temp_size_in_bytes", None)
    state, m = compiled(state, b)
    times, losses = [], [float(m["loss"])]
    for _ in range(steps):
        t0 = time.perf_counter()
        state, m = compiled(state, b)
        losses.append(float(m["loss"]))  # waits for the step
        times.append(time.perf_counter() - t0)
    live = sum(x.nbytes for x in jax.live_arrays())
    return {"mode": mode, "rank": MODES[mode], "batch": batch, "seq": seq,
            "trainable_params": n_train, "opt_state_bytes": opt_bytes, "compile_s": compile_s,
            "alone_step_times_s": times,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "live_buffer_bytes": live, "xla_temp_bytes": temp, "losses": losses}


def interleaved(batch: int, seq: int, repeats: int) -> dict[str, list[float]]:
    """Step times of every mode in one process, one step of each in turn (the
    order rotating), so that the shared machine's drift hits them alike."""
    built = {mode: list(build(mode, batch, seq)[:3]) for mode in MODES}
    for r in built.values():  # one untimed step each
        r[1], m = r[0](r[1], r[2])
        float(m["loss"])
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    order = list(MODES)
    for i in range(repeats):
        for mode in order[i % len(order):] + order[:i % len(order)]:
            r = built[mode]
            t0 = time.perf_counter()
            r[1], m = r[0](r[1], r[2])
            float(m["loss"])
            times[mode].append(time.perf_counter() - t0)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5,
                        help="timed rounds (one step of each mode per round)")
    parser.add_argument("--mode", choices=sorted(MODES), help="one measurement, printed as JSON")
    args = parser.parse_args(argv)
    if args.mode:
        print(json.dumps(measure(args.mode, args.batch, args.seq, args.steps)))
        return 0

    from experiments.common import markdown_table, write_report

    rows = []
    for mode in MODES:
        cmd = [sys.executable, "-m", "experiments.bench_lora", "--mode", mode, "--batch",
               str(args.batch), "--seq", str(args.seq), "--steps", "1"]
        done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if done.returncode:
            print(done.stderr, file=sys.stderr)
            return done.returncode
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{mode}: peak RSS {rows[-1]['peak_rss_bytes'] / 1e6:.0f} MB", file=sys.stderr)
    times = interleaved(args.batch, args.seq, args.steps)
    for r in rows:
        r["step_times_s"] = times[r["mode"]]
        r["step_s"] = statistics.median(times[r["mode"]])
        # the ratio to full fine-tuning: median of each round's own ratio
        r["x_full"] = statistics.median(t / f for t, f in zip(times[r["mode"]], times["full"]))
    mb = 1e6
    table = markdown_table(
        ["mode", "trainable params", "optimizer state MB", "step s (median)", "x full",
         "compile s", "peak RSS MB", "live buffers MB", "XLA temp MB"],
        [[r["mode"], f"{r['trainable_params']:,}", f"{r['opt_state_bytes'] / mb:.1f}",
          f"{r['step_s']:.2f}", f"{r['x_full']:.2f}",
          f"{r['compile_s']:.1f}", f"{r['peak_rss_bytes'] / mb:.0f}",
          f"{r['live_buffer_bytes'] / mb:.0f}",
          "-" if r["xla_temp_bytes"] is None else f"{r['xla_temp_bytes'] / mb:.0f}"]
         for r in rows])
    head = (f"GPT-2 124M (tied head), batch {args.batch} x {args.seq} tokens, AdamW; "
            f"{args.steps} interleaved rounds of one step per mode; {os.cpu_count()} CPU cores\n\n")
    write_report("bench_lora", {"rows": rows, "batch": args.batch, "seq": args.seq}, head + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
