"""Classifier fine-tuning speed: frozen layers cost no gradient work.

    python -m experiments.bench_classify                      # CPU: 6 layers x 384, batch 8 x 120
    python -m experiments.bench_classify --preset gpt2-124m   # the book's model shape (random)
    python -m experiments.bench_classify --steps 20 --repeats 3

For each trainable choice (head, last_block, all) this builds the engine's
train step with `classify_task` and reports what the compiled step does and
how fast it runs, in one process on one batch shape:

- `dot_general`s in the step's jaxpr (nested calls and scans included) and
  `dot`s in XLA's optimised HLO: with `last_block`, the backward pass stops
  at the last block, so the frozen blocks below it add forward products only;
- the compiled step's FLOPs by XLA's cost analysis;
- examples/s, timed in interleaved blocks (the machine is shared), medians.

The weights are random (no published weights here); speed does not depend on them.
"""

from __future__ import annotations

import argparse
import collections
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.common import markdown_table, write_report
from jaxllm.config import GPTConfig, get_preset
from jaxllm.finetune.classify import add_class_head, classify_task, trainable_for
from jaxllm.model import init_params
from jaxllm.train import TrainConfig, init_train_state, make_optimizer, make_train_step
from jaxllm.train.task import count_trainable

CHOICES = ("head", "last_block", "all")


def count_primitives(jaxpr, name: str) -> int:
    """Occurrences of primitive `name` in a jaxpr and every jaxpr nested in it
    (a scan body counts once)."""
    n = 0
    for eqn in jaxpr.eqns:
        n += eqn.primitive.name == name
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else [v]):
                inner = getattr(sub, "jaxpr", None)
                if inner is not None:
                    n += count_primitives(getattr(inner, "jaxpr", inner), name)
                elif hasattr(sub, "eqns"):
                    n += count_primitives(sub, name)
    return n


def hlo_dots(text: str) -> int:
    return sum(1 for line in text.splitlines() if " dot(" in line)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default=None, help="a model preset (default: 6 layers x 384)")
    p.add_argument("--length", type=int, default=120, help="tokens per row (the book's 120)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=3, help="timed blocks per choice")
    args = p.parse_args(argv)

    base = (get_preset(args.preset) if args.preset else
            GPTConfig(vocab_size=50257, context_length=1024, emb_dim=384, n_heads=6, n_layers=6))
    config = base.replace(qkv_bias=True, drop_rate=0.0)
    tc = TrainConfig.torch_adamw(5e-5, weight_decay=0.1, batch_size=args.batch,
                                 total_steps=10**6)
    optimizer = make_optimizer(tc)
    task = classify_task("last_token")
    key = jax.random.key(0)
    params = add_class_head(init_params(config, key), config, 2, key)
    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 50256, (args.batch, args.length)).astype(np.int32),
             "lengths": rng.integers(5, args.length + 1, args.batch).astype(np.int32),
             "labels": rng.integers(0, 2, args.batch).astype(np.int32)}

    rows, steps, states = [], {}, {}
    for choice in CHOICES:
        trainable = trainable_for(choice, config)
        plain = make_train_step(config, tc, optimizer, task=task, trainable=trainable, jit=False)
        state = init_train_state(jax.tree.map(jnp.copy, params), tc, optimizer,
                                 trainable=trainable)
        jaxpr = jax.make_jaxpr(plain)(state, batch)
        t0 = time.perf_counter()
        compiled = jax.jit(plain, donate_argnums=0).lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        state, m = compiled(state, batch)  # warm
        jax.block_until_ready(m)
        steps[choice], states[choice] = compiled, state
        rows.append({"trainable": choice,
                     "trainable_params": count_trainable(params, trainable),
                     "jaxpr_dot_general": count_primitives(jaxpr.jaxpr, "dot_general"),
                     "hlo_dots": hlo_dots(compiled.as_text()),
                     "gflops_per_step": float(cost.get("flops", float("nan"))) / 1e9,
                     "compile_s": compile_s})

    times = collections.defaultdict(list)
    for r in range(args.repeats):  # interleaved: a drift in machine speed hits every choice
        for choice in (CHOICES if r % 2 == 0 else CHOICES[::-1]):
            state = states[choice]
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, m = steps[choice](state, batch)
            jax.block_until_ready(m)
            times[choice].append(args.steps * args.batch / (time.perf_counter() - t0))
            states[choice] = state
    for row in rows:
        row["examples_per_s"] = statistics.median(times[row["trainable"]])
    all_row = rows[-1]
    for row in rows:
        row["speed_vs_all"] = row["examples_per_s"] / all_row["examples_per_s"]

    forward_dots = count_primitives(jax.make_jaxpr(
        lambda p, b: task(p, b, config, None))(params, batch).jaxpr, "dot_general")
    machine = (f"{platform.machine()}, {jax.devices()[0].device_kind}, "
               f"{jax.device_count()} device(s)")
    md = (f"# Classifier fine-tuning: frozen layers and gradient work\n\n"
          f"Model {config.n_layers} layers x {config.emb_dim} ({config.n_heads} heads), batch "
          f"{args.batch} x {args.length} tokens, last_token pooling, AdamW; {machine}. "
          f"The forward pass alone has {forward_dots} dot_generals in its jaxpr.\n\n"
          + markdown_table(["trainable", "params trained", "jaxpr dot_general", "HLO dots",
                            "GFLOP/step", "examples/s", "vs all", "compile s"],
                           [[r["trainable"], f"{r['trainable_params']:,}", r["jaxpr_dot_general"],
                             r["hlo_dots"], round(r["gflops_per_step"], 2),
                             round(r["examples_per_s"], 1), round(r["speed_vs_all"], 2),
                             round(r["compile_s"], 1)] for r in rows]))
    write_report("bench_classify", {"config": config.to_dict(), "batch": args.batch,
                                    "length": args.length, "machine": machine,
                                    "forward_dot_general": forward_dots, "rows": rows,
                                    "samples_examples_per_s": dict(times)}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
