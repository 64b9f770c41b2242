"""Train step time: the plain jitted step against the sharded step on a mesh.

    python -m experiments.bench_sharding --preset gpt2-124m --mesh fsdp=-1 --batch 16 --steps 20

Both start from the same state and see the same batches; the report gives
the median step time of each (after one compile step), the losses side by
side and the largest parameter difference at the end. On one device the mesh
is data=1,fsdp=1 and the two should match in time and value; on several, the
sharded step splits the batch and the state.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from experiments.common import markdown_table, write_report
from jaxllm.config import get_preset
from jaxllm.model import init_params
from jaxllm.train import TrainConfig, init_train_state, make_train_step
from jaxllm import sharding as sh


def timed_run(step, state, batches):
    times, losses = [], []
    for x, y in batches:
        start = time.perf_counter()
        state, metrics = step(state, {"tokens": x, "targets": y})
        losses.append(float(metrics["loss"]))  # waits for the step
        times.append(time.perf_counter() - start)
    return state, times, losses


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--mesh", default="fsdp=-1")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default: context)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--compute-dtype", default="float32")
    args = parser.parse_args(argv)

    config = get_preset(args.preset).replace(drop_rate=0.0, compute_dtype=args.compute_dtype,
                                             vocab_multiple=64)
    seq = args.seq or config.context_length
    tc = TrainConfig(batch_size=args.batch, total_steps=args.steps + 1, warmup_steps=2)
    rng = np.random.default_rng(0)
    batches = [(rng.integers(0, config.vocab_size, (args.batch, seq), dtype=np.int32),
                rng.integers(0, config.vocab_size, (args.batch, seq), dtype=np.int32))
               for _ in range(args.steps + 1)]

    plain_state = init_train_state(init_params(config, jax.random.key(tc.seed)), tc)
    plain_state, plain_times, plain_losses = timed_run(make_train_step(config, tc), plain_state,
                                                       batches)
    mesh = sh.make_mesh(args.mesh)
    state = sh.init_sharded_train_state(config, tc, mesh)
    state, times, losses = timed_run(sh.make_sharded_train_step(config, tc, mesh), state, batches)
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(plain_state.params)))

    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    rows = [["plain jit", "-", statistics.median(plain_times[1:]) * 1e3, plain_times[0],
             plain_losses[-1]],
            ["sharded", sh.mesh_description(mesh), statistics.median(times[1:]) * 1e3, times[0],
             losses[-1]]]
    md = (f"Train step on {device}, {args.preset} (vocab padded to 64), batch {args.batch} x "
          f"{seq} tokens, {args.compute_dtype} compute, {args.steps} timed steps\n\n"
          + markdown_table(["step", "mesh", "median step ms", "first step s", "last loss"], rows)
          + f"\nlargest parameter difference after {len(batches)} steps: {diff:.2e}; "
            f"largest loss difference: {max(abs(a - b) for a, b in zip(losses, plain_losses)):.2e}\n")
    write_report("bench_sharding", {"device": device, "args": vars(args), "plain_ms": plain_times,
                                    "sharded_ms": times, "plain_losses": plain_losses,
                                    "sharded_losses": losses, "max_param_diff": diff}, md)


if __name__ == "__main__":
    main()
