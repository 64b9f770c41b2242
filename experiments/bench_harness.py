"""Time per 1,000 lm-evaluation-harness requests: jaxllm's lm_eval model
against lm_eval's own `hf` model, on the same weights and requests.

    python -m experiments.bench_harness                     # GPT-2 124M shape, 200 requests
    python -m experiments.bench_harness --emb-dim 256 --layers 4 --requests 400

The weights are random (the GPT-2 architecture and vocabulary; speed does not
depend on their values), saved as a Hugging Face folder that both models load.
The requests are multiple-choice shaped `loglikelihood` calls: a context of
`--context` tokens and a continuation of 1 to 8 tokens, in random order. Each
model scores them once untimed (compilation, caches) and then timed; the time
is scaled to 1,000 requests. Writes results/bench_harness/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--emb-dim", type=int, default=768)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--context", type=int, default=96, help="mean context tokens")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="results/bench_harness")
    args = parser.parse_args()

    import jax
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from jaxllm.config import GPTConfig
    from jaxllm.eval.harness import JaxLLM
    from jaxllm.hf import save_hf
    from jaxllm.model import init_params
    from jaxllm.tokenizer import get_tokenizer

    config = GPTConfig(vocab_size=50257, context_length=1024, emb_dim=args.emb_dim,
                       n_heads=args.heads, n_layers=args.layers, drop_rate=0.0, qkv_bias=True)
    tokenizer = get_tokenizer("gpt2")
    rng = np.random.default_rng(0)
    words = tokenizer.decode(range(300, 20300)).split()
    requests = []
    for i in range(args.requests):
        n = int(rng.integers(args.context // 2, args.context * 3 // 2))
        context = " ".join(rng.choice(words, size=n))
        continuation = " " + " ".join(rng.choice(words, size=int(rng.integers(1, 5))))
        requests.append(Instance("loglikelihood", {}, (context, continuation), i))
    with tempfile.TemporaryDirectory() as folder:
        save_hf(folder, init_params(config, jax.random.key(0)), config)
        tokenizer_dir = tokenizer.directory
        for name in ("vocab.json", "merges.txt"):  # the transformers tokenizer for `hf`
            source = {"vocab.json": "encoder.json", "merges.txt": "vocab.bpe"}[name]
            os.symlink(os.path.join(tokenizer_dir, source), os.path.join(folder, name))
        models = {"jaxllm": JaxLLM(hf=folder, batch_size=args.batch_size),
                  "hf": HFLM(pretrained=folder, device="cpu", dtype="float32",
                             batch_size=args.batch_size)}
        results = {}
        for name, model in models.items():
            model.loglikelihood(requests, disable_tqdm=True)  # compile / warm up
            start = time.perf_counter()
            scores = model.loglikelihood(requests, disable_tqdm=True)
            seconds = time.perf_counter() - start
            results[name] = {"seconds": seconds, "per_1000": seconds * 1000 / len(requests),
                             "first": scores[0][0]}
            print(f"{name}: {seconds:.1f} s for {len(requests)} requests, "
                  f"{results[name]['per_1000']:.1f} s per 1,000", flush=True)
    record = {"config": config.to_dict() if hasattr(config, "to_dict") else str(config),
              "requests": args.requests, "batch_size": args.batch_size,
              "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
              "results": results}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(record, indent=1, default=str))
    print(json.dumps(record["results"]), "load", os.getloadavg())


if __name__ == "__main__":
    main()
