"""Load on `jaxllm serve` and on its peer, `transformers serve
--continuous-batching`, in one run: tokens/s and p50/p99 latency at 1, 8 and
32 concurrent clients, beside the same requests one after another through
`jaxllm.generate` in this process and transformers' `generate` in a fresh one.

    python -m experiments.bench_serve                  # GPT-2 124M shape, random weights
    python -m experiments.bench_serve --emb-dim 256 --layers 4 --heads 4 --context 256

The weights are random (the GPT-2 architecture and vocabulary; speed does not
depend on their values), saved once as a Hugging Face folder with GPT-2's
tokenizer files, and both servers load that folder: a real `jaxllm serve
--slots 32` process, then a real `transformers serve FOLDER
--continuous-batching --device cpu` process, each alone on a free 127.0.0.1
port. Both get the same text prompts (5 to 15 random GPT-2 words) on
`/v1/completions`, greedy, with the same `max_tokens` and no stop; tokens/s
counts the completion tokens each server reports. Each server answers one
untimed request before the timed levels (jaxllm serve also compiles its
buckets at start-up, as it does by default). PyTorch runs with its default
threads, one per core (`torch.get_num_threads()`, recorded); the
sequential `generate` runs on one thread as well (both recorded; the plot
shows the faster). Writes results/bench_serve/results.json, results.md and
throughput.png.

`--decode-steps` times the engine's decode step alone at 1, 2, 8 and `--slots`
occupied slots, with the compiled step's scratch memory and any copy of 1 MiB
or more (none: the cache is updated in place, and the idle slots are not
touched).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

JAXLLM, PEER = "jaxllm serve", "transformers serve --continuous-batching"
SEQ_JAXLLM, SEQ_TORCH = "jaxllm.generate, sequential", "transformers generate, sequential"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_folder(args) -> tuple[Path, object]:
    """The random GPT-2-shaped weights as a Hugging Face folder with GPT-2's
    tokenizer files, which both servers and both in-process baselines load."""
    import jax

    import jaxllm
    from jaxllm.hf import save_hf
    from jaxllm.tokenizer import get_tokenizer

    config = jaxllm.GPTConfig(vocab_size=50257, context_length=args.context,
                              emb_dim=args.emb_dim, n_heads=args.heads, n_layers=args.layers,
                              drop_rate=0.0, qkv_bias=True)
    folder = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    save_hf(folder, jaxllm.init_params(config, jax.random.PRNGKey(0)), config)
    tokenizer = get_tokenizer("gpt2")
    for name, source in (("vocab.json", "encoder.json"), ("merges.txt", "vocab.bpe")):
        shutil.copy(Path(tokenizer.directory) / source, folder / name)
    return folder, tokenizer


def wait_healthy(base: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before answering")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server did not answer {base}/health within {timeout:.0f} s")


def serve_levels(name, command, model, prompts, args, levels, summary, startup_timeout):
    """Start one server, answer one untimed request, then each level of
    concurrent clients; stop the server. Returns the texts of the 1-client
    level (for the cross-check of greedy answers)."""
    import httpx

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(command + ["--port", str(port)],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    texts = {}
    try:
        wait_healthy(base, proc, startup_timeout)
        client = httpx.Client(timeout=args.request_timeout)

        def ask(prompt):
            t = time.perf_counter()
            r = client.post(f"{base}/v1/completions", json={
                "model": model, "prompt": prompt, "max_tokens": args.max_tokens,
                "temperature": 0})
            r.raise_for_status()
            body = r.json()
            return time.perf_counter() - t, body["usage"]["completion_tokens"], \
                body["choices"][0]["text"]

        ask(prompts[0])
        for c in levels:
            n = args.requests or max(8, 2 * c)
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(c) as pool:
                out = list(pool.map(ask, prompts[:n]))
            summary(name, c, [o[0] for o in out], time.perf_counter() - t0,
                    sum(o[1] for o in out))
            if c == 1:
                texts = {p: o[2] for p, o in zip(prompts, out)}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    return texts


def sequential(params_config, folder, tokenizer, prompts, args, summary) -> None:
    """The same requests one after another in this process: `jaxllm.generate`
    and (unless --no-peer) transformers' `generate`, greedy, stopping at
    end-of-text as the servers do."""
    from jaxllm.generate import generate

    params, config = params_config
    n = args.requests or 8
    ids = [tokenizer.encode(p) for p in prompts[:n]]
    eot = 50256

    generate(params, config, ids[0], args.max_tokens, eos_id=eot)  # compile
    latencies, tokens, t0 = [], 0, time.perf_counter()
    for p in ids:
        t = time.perf_counter()
        out = generate(params, config, p, args.max_tokens, eos_id=eot)
        latencies.append(time.perf_counter() - t)
        tokens += int(out.lengths[0])
    summary(SEQ_JAXLLM, 1, latencies, time.perf_counter() - t0, tokens)
    if args.no_peer:
        return
    # in a fresh process: beside XLA's thread pool, torch's threads ran up to
    # 30x slower on this 2-core machine
    import multiprocessing

    for threads in sorted({os.cpu_count() or 1, 1}, reverse=True):
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            latencies, tokens, wall = pool.apply(torch_sequential, (
                str(folder), ids, args.max_tokens, threads))
        summary(f"{SEQ_TORCH}, {threads} torch thread{'s' * (threads > 1)}", 1, latencies,
                wall, tokens)


def torch_sequential(folder: str, ids, max_tokens: int, threads: int):
    """transformers' `generate` on each prompt in turn (greedy, end-of-text
    stops) on `threads` torch threads: the latencies, the tokens drawn and
    the wall time."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    eot = 50256
    model = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    kwargs = dict(max_new_tokens=max_tokens, do_sample=False, eos_token_id=eot,
                  pad_token_id=eot)
    with torch.inference_mode():
        model.generate(torch.tensor([ids[0]]), **kwargs)  # warm up
        latencies, tokens, t0 = [], 0, time.perf_counter()
        for p in ids:
            t = time.perf_counter()
            out = model.generate(torch.tensor([p]), **kwargs)
            latencies.append(time.perf_counter() - t)
            tokens += out.shape[1] - len(p)
    return latencies, tokens, time.perf_counter() - t0


def decode_steps(args) -> None:
    """`--decode-steps`: the engine's decode step alone, in this process, at a
    few numbers of occupied slots on a `--slots` cache: ms a step, the
    compiled step's scratch memory, and its copies of 1 MiB or more (none
    means the cache is updated in place)."""
    import re

    import jax
    import jax.numpy as jnp

    import jaxllm
    from jaxllm.cli.generate import inference_recipe
    from jaxllm.serve.engine import SlotEngine, _decode_step

    config = jaxllm.GPTConfig(vocab_size=50257, context_length=args.context,
                              emb_dim=args.emb_dim, n_heads=args.heads, n_layers=args.layers,
                              drop_rate=0.0, qkv_bias=True)
    if not args.xla_kernels:
        config = inference_recipe(config)
    engine = SlotEngine(jaxllm.init_params(config, jax.random.PRNGKey(0)), config, args.slots)
    for used in sorted({1, 2, 8, args.slots} & set(range(1, args.slots + 1))):
        active = np.arange(args.slots) < used
        zeros = np.zeros(args.slots)
        rows = next(b for b in engine.buckets if b >= used)
        z = jnp.zeros(rows)
        compiled = _decode_step.lower(
            engine.params, engine.state, jnp.ones(rows, bool), z.astype(jnp.float32),
            z.astype(jnp.float32) + 1, z.astype(jnp.uint32), z.astype(jnp.int32),
            config=config, rows=rows).compile()
        copies = [m.group(1) for m in re.finditer(r"= f32\[([0-9,]+)\]\{[^}]*\} copy\(",
                                                  compiled.as_text())
                  if 4 * np.prod([int(x) for x in m.group(1).split(",")]) >= 2 ** 20]
        for _ in range(2):
            engine.decode(active, zeros, zeros + 1, zeros, zeros)
        t = time.perf_counter()
        for _ in range(args.repeat):
            engine.decode(active, zeros, zeros + 1, zeros, zeros)
        ms = (time.perf_counter() - t) / args.repeat * 1e3
        print(json.dumps({"occupied": used, "rows": rows, "cache_length": engine.cache_length,
                          "ms_per_step": round(ms, 2),
                          "scratch_mib": round(compiled.memory_analysis().temp_size_in_bytes
                                               / 2 ** 20, 1),
                          "copies_of_1mib_or_more": copies,
                          "load_1min": round(os.getloadavg()[0], 2)}), flush=True)


def write_markdown(results, path: Path) -> None:
    rows = results["levels"]
    lines = ["| mode | clients | requests | tokens/s | p50 latency | p99 latency |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['clients']} | {r['requests']} | "
                     f"{r['tokens_per_s']:.1f} | {r['p50_s']:.2f} s | {r['p99_s']:.2f} s |")
    by = {(r["mode"], r["clients"]): r["tokens_per_s"] for r in rows}
    ratios = [f"| {c} | {by[(JAXLLM, c)] / by[(PEER, c)]:.2f} |"
              for c in sorted({r["clients"] for r in rows})
              if (JAXLLM, c) in by and (PEER, c) in by]
    if ratios:
        lines += ["", "| clients | jaxllm serve tokens/s / transformers serve tokens/s |",
                  "|---|---|", *ratios]
    m = results["model"]
    lines += ["", f"Model: GPT-2 architecture and vocabulary, random weights, {m['n_layers']} "
              f"layers, emb {m['emb_dim']}, {m['n_heads']} heads, context "
              f"{m['context_length']}; `jaxllm serve --slots {results['slots']}"
              f"{results.get('jaxllm_flags', '')}`, `max_tokens` "
              f"{results['max_tokens']}, greedy. Machine: {results['machine']}; torch threads "
              f"{results['torch_threads']}; load average {results['load_before']} before, "
              f"{results['load_after']} after.",
              f"Greedy answers of the 1-client level equal between the two servers: "
              f"{results['answers_equal']}."]
    path.write_text("\n".join(lines) + "\n")


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for mode, style in ((JAXLLM, "o-"), (PEER, "s-")):
        rows = [r for r in results["levels"] if r["mode"] == mode]
        if rows:
            ax.plot([r["clients"] for r in rows], [r["tokens_per_s"] for r in rows], style,
                    label=mode)
    torch_rows = [r for r in results["levels"] if r["mode"].startswith(SEQ_TORCH)]
    for mode, color in ((SEQ_JAXLLM, "tab:blue"), (SEQ_TORCH, "tab:orange")):
        rows = [r for r in results["levels"] if r["mode"] == mode]
        if mode == SEQ_TORCH and torch_rows:  # the faster thread count
            rows = [max(torch_rows, key=lambda r: r["tokens_per_s"])]
        if rows:
            ax.axhline(rows[0]["tokens_per_s"], color=color, ls="--", lw=1,
                       label=rows[0]["mode"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("generated tokens / s")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emb-dim", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=None,
                        help="requests per level (default: 2 x clients, at least 8)")
    parser.add_argument("--no-peer", action="store_true",
                        help="jaxllm only (no transformers serve, no transformers generate)")
    parser.add_argument("--startup-timeout", type=float, default=1200,
                        help="seconds a server may take to answer /health")
    parser.add_argument("--request-timeout", type=float, default=1200)
    parser.add_argument("--out", default="results/bench_serve")
    parser.add_argument("--decode-steps", action="store_true",
                        help="time the engine's decode step alone at 1, 2, 8 and --slots "
                             "occupied slots (no servers)")
    parser.add_argument("--repeat", type=int, default=10, help="steps timed (--decode-steps)")
    parser.add_argument("--xla-kernels", action="store_true",
                        help="serve on XLA's own kernels (default: `jaxllm serve --cpu-recipe`, "
                             "MKL's products on Intel CPUs, as torch uses them)")
    args = parser.parse_args(argv)
    if args.decode_steps:
        decode_steps(args)
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the server

    import torch

    import jaxllm

    load_before = [round(x, 2) for x in os.getloadavg()]
    folder, tokenizer = make_folder(args)
    rng = np.random.default_rng(0)
    words = tokenizer.decode(range(300, 20300)).split()
    levels = [int(c) for c in args.clients.split(",")]
    n_max = max(args.requests or max(8, 2 * c) for c in levels)
    prompts = [" ".join(rng.choice(words, size=int(rng.integers(5, 16)))) for _ in range(n_max)]
    results = {"model": {"emb_dim": args.emb_dim, "n_layers": args.layers,
                         "n_heads": args.heads, "context_length": args.context,
                         "vocab_size": 50257},
               "slots": args.slots, "max_tokens": args.max_tokens,
               "jaxllm_flags": "" if args.xla_kernels else " --cpu-recipe",
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                          f"{platform.platform(terse=True)}",
               "torch_threads": torch.get_num_threads(), "load_before": load_before,
               "levels": []}

    def summary(name, clients, latencies, wall, tokens):
        lat = np.array(latencies)
        row = {"mode": name, "clients": clients, "requests": len(latencies), "tokens": tokens,
               "tokens_per_s": tokens / wall, "p50_s": float(np.percentile(lat, 50)),
               "p99_s": float(np.percentile(lat, 99)), "wall_s": wall,
               "load_1min": round(os.getloadavg()[0], 2)}
        print(json.dumps(row), flush=True)
        results["levels"].append(row)

    try:
        sequential(jaxllm.load_hf(folder), folder, tokenizer, prompts, args, summary)
        ours = serve_levels(JAXLLM, [sys.executable, "-m", "jaxllm", "serve", "--hf",
                                     str(folder), "--tokenizer", "gpt2", "--slots",
                                     str(args.slots), "--model-name", "gpt2"]
                            + ([] if args.xla_kernels else ["--cpu-recipe"]),
                            "gpt2", prompts, args, levels, summary, args.startup_timeout)
        theirs = {}
        if not args.no_peer:
            cli = shutil.which("transformers") or str(Path(sys.executable).parent / "transformers")
            theirs = serve_levels(PEER, [cli, "serve", str(folder), "--continuous-batching",
                                         "--device", "cpu", "--host", "127.0.0.1",
                                         "--log-level", "warning"],
                                  str(folder), prompts, args, levels, summary,
                                  args.startup_timeout)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    same = sum(ours.get(p) == theirs.get(p) for p in theirs)
    results["answers_equal"] = f"{same}/{len(theirs)}" if theirs else "not compared"
    results["load_after"] = [round(x, 2) for x in os.getloadavg()]

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    write_markdown(results, out_dir / "results.md")
    plot(results, out_dir / "throughput.png")
    print((out_dir / "results.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
