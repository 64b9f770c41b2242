"""`jaxllm lora`: fold a LoRA run's adapters into its weights, or write them alone.

    jaxllm lora merge  --run-dir runs/lora --out exported/   # model.safetensors + config.json
    jaxllm lora export --run-dir runs/lora --out adapters.safetensors   # the adapters only

`merge` writes the merged model in the Hugging Face GPT-2 format (`jaxllm
generate --hf exported/` reads it, and so does `transformers`); `export`
writes the adapter-only file that `jaxllm.lora.load_adapters` puts onto any
base of the same shape.

Training commands take LoRA through `add_lora_arguments(parser)` (the
`--lora-rank`, `--lora-alpha`, `--lora-targets`, `--lora-qkv` flags) and
`apply_lora_args(params, config, args, key)`, which returns the parameters
with adapters and the `trainable` regex to train them alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ACTIONS = ("merge", "export")


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """The LoRA flags of a training command; off unless --lora-rank is given."""
    group = parser.add_argument_group("LoRA (low-rank adapters; jaxllm.lora)")
    group.add_argument("--lora-rank", type=int, default=None, metavar="R",
                       help="train rank-R adapters on frozen weights instead of every weight")
    group.add_argument("--lora-alpha", type=float, default=None,
                       help="adapter scale alpha (the path is multiplied by alpha / rank); "
                            "default: the rank")
    group.add_argument("--lora-targets", default="all", metavar="WHICH",
                       help="dense layers to adapt: attn, ffn, head, all (default), presets "
                            "joined by commas, or a regex over paths such as blocks/0/attn/qkv")
    group.add_argument("--lora-qkv", default="split", choices=("split", "fused"),
                       help="q, k and v as three adapters (split, default) or one on the fused "
                            "projection (fused, as PEFT on GPT-2's c_attn)")


def apply_lora_args(params, config, args, key=None):
    """(params, trainable): with --lora-rank, the parameters with fresh adapters
    and `jaxllm.lora.TRAINABLE`; without it, `params` as they are and None
    (train everything). `key` (default: key 0) draws the adapters' A."""
    rank = getattr(args, "lora_rank", None)
    if rank is None:
        if getattr(args, "lora_alpha", None) is not None:
            raise ValueError("--lora-alpha needs --lora-rank")
        return params, None
    import jax

    from jaxllm import lora

    key = jax.random.key(0) if key is None else key
    adapted = lora.lora_params(params, config, key, rank=rank, alpha=args.lora_alpha,
                               targets=args.lora_targets, qkv=args.lora_qkv)
    return adapted, lora.TRAINABLE


def describe(params) -> str:
    """'LoRA: N adapters, M trainable parameters' for a tree with adapters."""
    from jaxllm import lora

    adapters, _ = lora.adapters_of(params)
    return (f"LoRA: {len(adapters)} adapted dense layers, "
            f"{lora.count_lora_params(adapters):,} trainable parameters")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS,
                        help="merge: the run's adapters folded into its weights, as a Hugging "
                             "Face GPT-2 folder; export: the adapters alone, one safetensors file")
    parser.add_argument("--run-dir", required=True, metavar="RUN",
                        help="a run trained with --lora-rank (its latest checkpoint)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="merge: output folder; export: output .safetensors file")


def run(args) -> int:
    from jaxllm import lora
    from jaxllm.hf import hf_config_kwargs, save_safetensors
    from jaxllm.train.checkpoint import load_params

    try:
        params, config, tokenizer = load_params(args.run_dir, args.step)
        adapters, scales = lora.adapters_of(params)
        if not adapters:
            raise ValueError(f"{args.run_dir} holds no adapters (was it trained with --lora-rank?)")
        out = Path(args.out)
        if args.action == "merge":
            merged, config = lora.merge_model(params, config)  # a tied head's adapter unties it
            out.mkdir(parents=True, exist_ok=True)
            save_safetensors(merged, config, out / "model.safetensors")
            hf = dict(hf_config_kwargs(config), model_type="gpt2",
                      architectures=["GPT2LMHeadModel"])
            (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
            print(f"merged {len(adapters)} adapters into {out / 'model.safetensors'}")
        else:
            alphas = {round(scales[p] * ab["a"].shape[-1], 6) for p, ab in adapters.items()}
            if len(alphas) != 1:
                raise ValueError(f"the adapters of {args.run_dir} have different alphas {alphas}")
            if out.parent:
                os.makedirs(out.parent, exist_ok=True)
            lora.save_adapters(out, adapters, alphas.pop(), config, tokenizer=tokenizer,
                               run_dir=str(args.run_dir))
            print(f"wrote {len(adapters)} adapters ({lora.count_lora_params(adapters):,} "
                  f"parameters, {out.stat().st_size / 1e6:.1f} MB) to {out}")
    except (ValueError, FileNotFoundError) as err:
        print(f"jaxllm lora: error: {err}", file=sys.stderr)
        return 2
    return 0
