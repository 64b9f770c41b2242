"""GPT-2 124M: where its parameters are, and one forward pass next to PyTorch.

Builds `GPT_CONFIG_124M` with random weights, tabulates the parameters per
component, runs a short prompt (GPT-2 tokenizer) through jaxllm and through
Hugging Face's `GPT2LMHeadModel` holding the same weights, and reports the
largest logit difference and both models' top next-token predictions.

    python -m experiments.model [--tokenizer-dir DIR] [--prompt TEXT] [--seed N]

The GPT-2 vocabulary files (`gpt2.tiktoken`, or `encoder.json` + `vocab.bpe`)
come from `--tokenizer-dir`, else `$JAXLLM_GPT2_DIR`, else a `shared/data`
folder above the checkout. Nothing is downloaded: without the files the
experiment says it is skipped, and why, and exits 0, so that `make
experiments` runs offline on a fresh clone.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

from experiments.common import markdown_table, write_report
from jaxllm import GPT_CONFIG_124M, GPTConfig, count_params, forward, init_params, param_shapes
from jaxllm.hf import hf_config_kwargs, to_hf_state_dict
from jaxllm.tokenizer import GPT2_DIR_ENV, GPT2Tokenizer, gpt2_files, shared_data_folders

# (label, path prefix in the parameter tree of one block)
BLOCK_PARTS = [
    ("LayerNorm 1", "norm1/"),
    ("attention q, k, v projection", "attn/qkv/"),
    ("attention output projection", "attn/out/"),
    ("LayerNorm 2", "norm2/"),
    ("feed-forward expansion", "ffn/fc/"),
    ("feed-forward projection", "ffn/proj/"),
]


def parameter_table(config: GPTConfig) -> tuple[list[dict], dict]:
    """Rows (component, shapes, count) and totals, from the config's parameter shapes."""
    shapes = param_shapes(config)

    def part(prefix: str) -> tuple[str, int]:
        items = {k: s for k, s in shapes.items() if k.startswith(prefix)}
        described = ", ".join(f"{k[len(prefix):]} {tuple(s)}" for k, s in items.items())
        return described, sum(math.prod(s) for s in items.values())

    rows = []

    def add(component: str, prefix: str, times: int = 1) -> int:
        described, n = part(prefix)
        rows.append({"component": component, "shapes": described, "count": n, "times": times,
                     "total": n * times})
        return n * times

    total = add("token embedding", "tok_emb/")
    total += add("position embedding", "pos_emb/")
    for label, prefix in BLOCK_PARTS:
        total += add(f"block: {label}", f"blocks/0/{prefix}", config.n_layers)
    total += add("final LayerNorm", "final_norm/")
    head = add("output head", "out_head/") if not config.tie_embeddings else 0
    total += head
    block = sum(r["count"] for r in rows if r["component"].startswith("block:"))
    assert total == count_params(config)
    totals = {
        "total": total,
        "one_block": block,
        "all_blocks": block * config.n_layers,
        "output_head": head,
        "total_with_tied_head": total - head,
        "float32_mib": total * 4 / 2**20,
    }
    return rows, totals


def torch_reference(params, config: GPTConfig, tokens: np.ndarray) -> np.ndarray:
    """Logits of Hugging Face's GPT2LMHeadModel holding the same weights."""
    import torch
    import transformers

    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_kwargs(config)))
    # Copies: torch wants writable arrays, and those from JAX are read-only.
    state = {k: torch.from_numpy(v.copy()) for k, v in to_hf_state_dict(params, config).items()}
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        return model.eval()(torch.from_numpy(tokens)).logits.numpy()


def top_tokens(logits: np.ndarray, tokenizer, k: int) -> list[dict]:
    order = np.argsort(-logits)[:k]
    return [{"id": int(i), "token": tokenizer.decode([int(i)]), "logit": float(logits[i])}
            for i in order]


def _has_vocabulary(directory: Path) -> bool:
    return directory.is_dir() and gpt2_files(directory) is not None


def find_vocabulary(given: str | None) -> tuple[Path | None, str]:
    """(the folder with the GPT-2 vocabulary files, or None; where it looked):
    `jaxllm.tokenizer`'s places, but a folder asked for is that folder or
    nothing, and nothing is downloaded."""
    if given is None:
        given = os.environ.get(GPT2_DIR_ENV) or None
    if given is not None:  # asked for: that folder or nothing
        where = f"{given} (--tokenizer-dir or ${GPT2_DIR_ENV})"
        return (Path(given) if _has_vocabulary(Path(given)) else None), where
    found = next((c for c in shared_data_folders() if _has_vocabulary(c)), None)
    return found, "shared/data above the checkout"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer-dir", default=None,
                        help="folder with gpt2.tiktoken (or encoder.json + vocab.bpe); "
                             "default $JAXLLM_GPT2_DIR")
    parser.add_argument("--prompt", default="Every effort moves you")
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--top", type=int, default=5, help="next-token predictions to show")
    args = parser.parse_args(argv)

    directory, where = find_vocabulary(args.tokenizer_dir)
    if directory is None:
        print(f"model: skipped: no GPT-2 vocabulary files (gpt2.tiktoken, or encoder.json + "
              f"vocab.bpe) in {where}, and this experiment downloads nothing; pass "
              f"--tokenizer-dir DIR or set ${GPT2_DIR_ENV} to run it", file=sys.stderr)
        return 0
    try:
        tokenizer = GPT2Tokenizer(directory)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    config = GPT_CONFIG_124M.replace(drop_rate=0.0)  # inference: dropout plays no part
    rows, totals = parameter_table(config)

    start = time.perf_counter()
    params = init_params(config, jax.random.key(args.seed))
    initialised = sum(x.size for x in jax.tree.leaves(params))
    assert initialised == totals["total"], (initialised, totals["total"])
    tokens = np.asarray([tokenizer.encode(args.prompt)])
    logits = np.asarray(forward(params, tokens, config))
    jax_seconds = time.perf_counter() - start

    start = time.perf_counter()
    torch_logits = torch_reference(params, config, tokens)
    torch_seconds = time.perf_counter() - start
    max_diff = float(np.abs(logits - torch_logits).max())
    ours, theirs = top_tokens(logits[0, -1], tokenizer, args.top), top_tokens(
        torch_logits[0, -1], tokenizer, args.top)

    md = ["# GPT-2 124M: parameters and a forward pass against PyTorch\n",
          f"Configuration: {config.architecture()}\n",
          "## Parameters per component\n",
          markdown_table(["component", "shapes", "parameters", "x", "total"],
                         [[r["component"], r["shapes"], f"{r['count']:,}", r["times"],
                           f"{r['total']:,}"] for r in rows]),
          f"- one transformer block: {totals['one_block']:,}; "
          f"{config.n_layers} blocks: {totals['all_blocks']:,}",
          f"- total: **{totals['total']:,}** parameters "
          f"({totals['float32_mib']:.2f} MiB in float32)",
          f"- with the output head tied to the token embedding: "
          f"**{totals['total_with_tied_head']:,}** "
          f"({totals['total_with_tied_head'] * 4 / 2**20:.2f} MiB)\n",
          "## Forward pass (random weights, seed "
          f"{args.seed})\n",
          f"Prompt {args.prompt!r} -> token ids {tokens[0].tolist()}; logits {logits.shape}.\n",
          f"- max |jaxllm - transformers.GPT2LMHeadModel| over all logits: **{max_diff:.3g}**",
          f"- time: jaxllm init + forward {jax_seconds:.1f} s, "
          f"torch build + forward {torch_seconds:.1f} s\n",
          "Top next-token predictions after the prompt:\n",
          markdown_table(["rank", "jaxllm token", "jaxllm logit", "torch token", "torch logit"],
                         [[i + 1, repr(a["token"]), a["logit"], repr(b["token"]), b["logit"]]
                          for i, (a, b) in enumerate(zip(ours, theirs))])]
    data = {"config": config.to_dict(), "parameters": rows, "totals": totals,
            "prompt": args.prompt, "token_ids": tokens[0], "seed": args.seed,
            "max_abs_logit_diff_vs_torch": max_diff, "top_next_tokens_jax": ours,
            "top_next_tokens_torch": theirs,
            "same_top_tokens": [a["id"] for a in ours] == [b["id"] for b in theirs],
            "seconds": {"jax": jax_seconds, "torch": torch_seconds}}
    write_report("model", data, "\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
