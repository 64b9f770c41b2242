"""Generation speed: jaxllm with its key-value cache, the uncached loop, and
PyTorch transformers' `generate` (with its cache), on the GPT-2 124M shape.

Random weights (nothing is downloaded), the same weights in both frameworks,
batch 1, a 16-token prompt, greedy decoding. Each timing is the median of
several repeats after a warm-up run that compiles everything.

The uncached loop is slow (a whole forward pass per token, over the sequence
padded to its power-of-two bucket), so it is run for real on the first
`--uncached-tokens` new tokens only (the cached decode is timed on those same
tokens for a like-for-like ratio). Its time for all new tokens is estimated
from one step per bucket: the sum over steps of the step time of the bucket
that step falls in.

    python -m experiments.bench_generate [--new-tokens 256] [--repeats 5]

Writes results/bench_generate/results.json and results.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import jax
import numpy as np
import torch
import transformers

import jaxllm
from experiments.common import markdown_table, write_report
from jaxllm.generate import generate, generate_simple, prompt_bucket
from jaxllm.hf import hf_config_kwargs

CONFIG = jaxllm.GPT_CONFIG_124M.replace(qkv_bias=True, tie_embeddings=True, drop_rate=0.0)


def median_seconds(fn, repeats: int) -> tuple[float, list[float]]:
    """Median wall time of `fn()` over `repeats` runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def torch_model(params) -> transformers.GPT2LMHeadModel:
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_kwargs(CONFIG)))
    state = {k: torch.tensor(v) for k, v in jaxllm.to_hf_state_dict(params, CONFIG).items()}
    model.load_state_dict(state, strict=False)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--uncached-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--uncached-repeats", type=int, default=3)
    args = parser.parse_args()

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(threads)  # XLA's CPU backend uses every core it is given
    params = jaxllm.init_params(CONFIG, jax.random.PRNGKey(0))
    prompt = np.random.default_rng(0).integers(0, CONFIG.vocab_size, args.prompt_tokens).tolist()
    n, n_unc = args.new_tokens, args.uncached_tokens

    def cached(count):
        return lambda: generate(params, CONFIG, prompt, count)

    results = {}
    t, runs = median_seconds(cached(n), args.repeats)
    results["jaxllm_cached"] = dict(tokens=n, seconds=t, runs=runs)
    progress(f"jaxllm cached {n} tokens: {t:.2f} s")
    t, runs = median_seconds(cached(n_unc), args.repeats)
    results["jaxllm_cached_short"] = dict(tokens=n_unc, seconds=t, runs=runs)
    progress(f"jaxllm cached {n_unc} tokens: {t:.2f} s")
    t, runs = median_seconds(lambda: generate_simple(params, CONFIG, prompt, n_unc),
                             args.uncached_repeats)
    results["jaxllm_uncached_short"] = dict(tokens=n_unc, seconds=t, runs=runs)
    progress(f"jaxllm uncached {n_unc} tokens: {t:.2f} s")
    # one uncached step per bucket the full run passes through
    bucket_of_step = [prompt_bucket(len(prompt) + i, CONFIG.context_length) for i in range(n)]
    step_seconds = {}
    for bucket in sorted(set(bucket_of_step)):
        seq = (prompt * (bucket // len(prompt) + 1))[:bucket]
        step_seconds[bucket], _ = median_seconds(
            lambda: generate_simple(params, CONFIG, seq, 1), args.uncached_repeats)
        progress(f"uncached step, padded length {bucket}: {step_seconds[bucket]:.3f} s")
    estimate = sum(step_seconds[b] for b in bucket_of_step)
    results["jaxllm_uncached_estimated"] = dict(tokens=n, seconds=estimate,
                                                step_seconds_by_bucket=step_seconds)

    model = torch_model(params)
    input_ids = torch.tensor([prompt])
    mask = torch.ones_like(input_ids)

    def torch_generate():
        with torch.no_grad():
            return model.generate(input_ids, attention_mask=mask, max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, use_cache=True,
                                  eos_token_id=None, pad_token_id=0)

    t, runs = median_seconds(torch_generate, args.repeats)
    results["torch_cached"] = dict(tokens=n, seconds=t, runs=runs)
    progress(f"torch cached {n} tokens: {t:.2f} s")
    for r in results.values():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]

    ours = generate(params, CONFIG, prompt, n).tokens[0]
    theirs = torch_generate()[0, len(prompt):].numpy()
    same = np.flatnonzero(ours != theirs)
    agreement = dict(identical=bool(same.size == 0),
                     first_difference=int(same[0]) if same.size else None)

    tps = {k: r["tokens_per_s"] for k, r in results.items()}
    ratios = {
        "cached_over_uncached_same_tokens":
            tps["jaxllm_cached_short"] / tps["jaxllm_uncached_short"],
        "cached_over_uncached_estimated": tps["jaxllm_cached"] / tps["jaxllm_uncached_estimated"],
        "jaxllm_cached_over_torch": tps["jaxllm_cached"] / tps["torch_cached"],
    }
    machine = dict(platform=platform.platform(),
                   processor=platform.processor() or platform.machine(),
                   cores=threads, torch_threads=torch.get_num_threads(),
                   jax=jax.__version__, jax_device=str(jax.devices()[0]),
                   torch=torch.__version__, transformers=transformers.__version__)
    data = dict(config="GPT-2 124M shape (qkv_bias, tied head), random init, float32",
                prompt_tokens=args.prompt_tokens, batch=1, decoding="greedy",
                results=results, ratios=ratios, tokens_agree_with_torch=agreement,
                machine=machine)

    rows = [
        ("jaxllm generate (KV cache)", n, results["jaxllm_cached"]["seconds"],
         tps["jaxllm_cached"]),
        ("PyTorch transformers generate (KV cache)", n, results["torch_cached"]["seconds"],
         tps["torch_cached"]),
        ("jaxllm generate_simple (no cache), estimated from one step per bucket", n,
         results["jaxllm_uncached_estimated"]["seconds"], tps["jaxllm_uncached_estimated"]),
        ("jaxllm generate (KV cache)", n_unc, results["jaxllm_cached_short"]["seconds"],
         tps["jaxllm_cached_short"]),
        ("jaxllm generate_simple (no cache)", n_unc, results["jaxllm_uncached_short"]["seconds"],
         tps["jaxllm_uncached_short"]),
    ]
    md = (f"# Generation speed\n\n{data['config']}; batch 1, {args.prompt_tokens}-token prompt, "
          f"greedy; median of {args.repeats} runs ({args.uncached_repeats} for the uncached "
          f"loop) after a warm-up.\n\n"
          + markdown_table(["implementation", "new tokens", "seconds", "tokens/s"], rows)
          + f"\n- cached / uncached, {n} tokens (uncached estimated): "
            f"{ratios['cached_over_uncached_estimated']:.1f}x\n"
          + f"- cached / uncached, the first {n_unc} tokens (both measured): "
            f"{ratios['cached_over_uncached_same_tokens']:.1f}x\n"
          + "- uncached step seconds by padded length: "
          + ", ".join(f"{b}: {t:.3f}" for b, t in step_seconds.items()) + "\n"
          + f"- jaxllm cached / PyTorch cached, {n} tokens: "
            f"{ratios['jaxllm_cached_over_torch']:.2f}x\n"
          + f"- greedy tokens identical to PyTorch's: {agreement['identical']}"
          + (f" (first difference at token {agreement['first_difference']})"
             if not agreement["identical"] else "") + "\n"
          + f"- machine: {machine['processor']}, {threads} cores (torch threads "
            f"{machine['torch_threads']}), jax {machine['jax']} on {machine['jax_device']}, "
            f"torch {machine['torch']}, transformers {machine['transformers']}\n")
    write_report("bench_generate", data, md)


if __name__ == "__main__":
    main()
