"""Load on `jaxllm serve`: tokens/s and p50/p99 latency at 1, 8 and 32
concurrent clients, against the same requests one after another through
`jaxllm.generate` in this process.

    python -m experiments.bench_serve                  # GPT-2 124M shape, random weights
    python -m experiments.bench_serve --emb-dim 256 --layers 4 --max-tokens 16

The weights are random (the GPT-2 architecture and vocabulary; speed does not
depend on their values), saved as a Hugging Face folder and served by a real
`jaxllm serve --slots 32` process on a free 127.0.0.1 port. Every request is
greedy with a fixed `max_tokens` and no stop, so each yields exactly
`max_tokens` tokens. Writes results/bench_serve/results.json and
throughput.png.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    parser.add_argument("--out", default="results/bench_serve")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still stop the server

    import httpx
    import jax
    import transformers

    import jaxllm
    from jaxllm.generate import generate
    from jaxllm.hf import hf_config_kwargs, save_safetensors

    config = jaxllm.GPTConfig(vocab_size=50257, context_length=args.context,
                              emb_dim=args.emb_dim, n_heads=args.heads, n_layers=args.layers,
                              drop_rate=0.0, qkv_bias=True)
    params = jaxllm.init_params(config, jax.random.PRNGKey(0))
    folder = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    save_safetensors(params, config, folder / "model.safetensors")
    transformers.GPT2Config(**hf_config_kwargs(config)).save_pretrained(folder)
    rng = np.random.default_rng(0)
    levels = [int(c) for c in args.clients.split(",")]
    n_max = max(args.requests or max(8, 2 * c) for c in levels)
    prompts = [rng.integers(0, 50256, size=int(rng.integers(5, 16))).tolist()
               for _ in range(n_max)]
    results = {"model": {"emb_dim": args.emb_dim, "n_layers": args.layers,
                         "context_length": args.context, "vocab_size": 50257},
               "slots": args.slots, "max_tokens": args.max_tokens, "levels": []}

    def summary(name, clients, latencies, wall, tokens):
        lat = np.array(latencies)
        row = {"mode": name, "clients": clients, "requests": len(latencies),
               "tokens_per_s": tokens / wall, "p50_s": float(np.percentile(lat, 50)),
               "p99_s": float(np.percentile(lat, 99)), "wall_s": wall}
        print(json.dumps(row), flush=True)
        results["levels"].append(row)

    # the baseline: generate, one request after another, in this process
    n_seq = args.requests or 8
    generate(params, config, prompts[0], args.max_tokens)  # compile
    latencies, t0 = [], time.perf_counter()
    for p in prompts[:n_seq]:
        t = time.perf_counter()
        generate(params, config, p, args.max_tokens)
        latencies.append(time.perf_counter() - t)
    summary("sequential generate", 1, latencies, time.perf_counter() - t0,
            n_seq * args.max_tokens)

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jaxllm", "serve", "--hf", str(folder),
                             "--tokenizer", "gpt2", "--slots", str(args.slots),
                             "--model-name", "gpt2", "--port", str(port), "--no-warmup"],
                            env={**os.environ})
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        client = httpx.Client(timeout=600)

        def ask(p):
            t = time.perf_counter()
            r = client.post(f"{base}/v1/completions", json={
                "model": "gpt2", "prompt": p, "max_tokens": args.max_tokens, "temperature": 0,
                "stop": None})
            r.raise_for_status()
            body = r.json()
            return time.perf_counter() - t, body["usage"]["completion_tokens"]

        ask(prompts[0])  # compile the 16-token bucket and the decode step
        for c in levels:
            n = args.requests or max(8, 2 * c)
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(c) as pool:
                out = list(pool.map(ask, prompts[:n]))
            summary("jaxllm serve", c, [o[0] for o in out], time.perf_counter() - t0,
                    sum(o[1] for o in out))
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    served = [r for r in results["levels"] if r["mode"] == "jaxllm serve"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["clients"] for r in served], [r["tokens_per_s"] for r in served], "o-",
            label="jaxllm serve")
    ax.axhline(results["levels"][0]["tokens_per_s"], color="gray", ls="--",
               label="generate, sequential")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("generated tokens / s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "throughput.png", dpi=150)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
