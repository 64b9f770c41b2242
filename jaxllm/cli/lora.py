"""`jaxllm lora`: fold a LoRA run's adapters into its weights, or write them alone.

    jaxllm lora merge  --run-dir runs/lora --out exported/   # model.safetensors + config.json
    jaxllm lora export --run-dir runs/lora --out adapters.safetensors   # the adapters only

`merge` writes the merged model in the Hugging Face GPT-2 format (`jaxllm
generate --hf exported/` reads it, and so does `transformers`); an adapter on
a tied head unties it there (`jaxllm.lora.merge_model`: the folder gets its
own lm_head.weight and tie_word_embeddings false). A `jaxllm finetune
classify` run has a class head, which no GPT-2 LM head folder can hold: its
merge is a jaxllm run folder instead (one checkpoint of the merged
classifier, no optimizer state), for `jaxllm classify --run-dir` and
`jaxllm finetune classify --run-dir`. `export` writes the adapter-only file
that `jaxllm.lora.load_adapters` puts onto any base of the same shape (the
adapters alone: a classification run's head is not in it).

Training commands (`jaxllm pretrain`, `jaxllm finetune classify`, `jaxllm
finetune instruct`) take LoRA through `add_lora_arguments(parser)` (the
`--lora-rank`, `--lora-alpha`, `--lora-targets`, `--lora-qkv` flags) and
`lora_start(...)`, which returns the parameters with adapters (fresh, or on
--resume the run's own) and the `trainable` regex to train them alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ACTIONS = ("merge", "export")
QKV_MODES = ("split", "fused")


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """The LoRA flags of a training command; off unless --lora-rank is given
    (or --resume finds a LoRA run)."""
    group = parser.add_argument_group("LoRA (low-rank adapters; jaxllm.lora)")
    group.add_argument("--lora-rank", type=int, default=None, metavar="R",
                       help="train rank-R adapters on frozen weights instead of every weight; "
                            "--resume continues a LoRA run without the flags")
    group.add_argument("--lora-alpha", type=float, default=None,
                       help="adapter scale alpha (the path is multiplied by alpha / rank); "
                            "default: the rank")
    group.add_argument("--lora-targets", default=None, metavar="WHICH",
                       help="dense layers to adapt: attn, ffn, head (the LM head, tied or not), "
                            "all (default), presets joined by commas, or a regex over paths "
                            "such as blocks/0/attn/qkv")
    group.add_argument("--lora-qkv", default=None, choices=QKV_MODES,
                       help="q, k and v as three adapters (split, default) or one on the fused "
                            "projection (fused, as PEFT on GPT-2's c_attn)")


def apply_lora_args(params, config, args, key=None, *, tied_head: bool = True,
                    also: str | None = None, exclude: tuple[str, ...] = ()):
    """(params, trainable): with --lora-rank, the parameters with fresh adapters
    and `jaxllm.lora.trainable(also)` (the adapters, plus the leaves `also`
    matches: a new task head); without it, `params` as they are and None
    (train everything). `key` (default: key 0) draws the adapters' A;
    `tied_head=False` leaves a tied LM head out and `exclude` the top-level
    entries named (a model that replaces its LM head: "out_head", a task head)."""
    rank = getattr(args, "lora_rank", None)
    if rank is None:
        for flag in ("alpha", "targets", "qkv"):
            if getattr(args, f"lora_{flag}", None) is not None:
                raise ValueError(f"--lora-{flag} needs --lora-rank")
        return params, None
    import jax

    from jaxllm import lora

    key = jax.random.key(0) if key is None else key
    adapters = lora.init_lora(_without(params, exclude), config, key, rank=rank,
                              targets=args.lora_targets or "all", qkv=args.lora_qkv or "split",
                              tied_head=tied_head)
    alpha = float(rank if args.lora_alpha is None else args.lora_alpha)
    return lora.with_adapters(params, adapters, alpha), lora.trainable(also)


def _without(params, exclude):
    return {k: v for k, v in params.items() if k not in exclude} if exclude else params


def saved_lora(run_dir) -> dict | None:
    """What the latest checkpoint of a run folder holds of LoRA: None when there
    is no checkpoint; else {"adapters": {path: {"a", "b"}}, "alpha", "rank",
    "scales", "qkv"} (alpha and rank None when they differ between layers, qkv None
    without a qkv adapter; "adapters" empty for a run that trained every weight).
    The parameters are read to get the adapters' scale (alpha / rank)."""
    from jaxllm import lora
    from jaxllm.train import checkpoint

    try:
        manager = checkpoint.open_manager(run_dir)
    except FileNotFoundError:
        return None
    try:
        if manager.latest_step() is None:
            return None
    finally:
        manager.close()
    # Quietly: the resume that follows reports (or refuses) a damaged checkpoint itself.
    params, _ = checkpoint.load_params_and_meta(run_dir, report=lambda line: None)
    adapters, scales = lora.adapters_of(params)
    ranks = {int(ab["a"].shape[-1]) for ab in adapters.values()}
    alphas = {round(scales[p] * ab["a"].shape[-1], 6) for p, ab in adapters.items()}
    modes = {"split" if ab["a"].ndim == 3 else "fused" for p, ab in adapters.items()
             if p.rsplit("/", 1)[-1] == "qkv"}
    one = (lambda xs: next(iter(xs)) if len(xs) == 1 else None)
    return {"adapters": adapters, "scales": scales, "alpha": one(alphas), "rank": one(ranks),
            "qkv": one(modes)}


def _targets_name(params, layers, tied_head: bool) -> str:
    """A preset (or presets joined by commas) that selects exactly `layers`, else
    the layers themselves."""
    from jaxllm import lora

    for name in ("all", "attn", "ffn", "head", "attn,ffn", "attn,head", "ffn,head"):
        try:
            if set(lora.select_targets(params, name, tied_head=tied_head)) == set(layers):
                return name
        except ValueError:
            pass
    shown = sorted(layers)
    return ", ".join(shown[:4]) + (f", ... ({len(shown)} layers)" if len(shown) > 4 else "")


def lora_start(make_base, config, args, key=None, *, run_dir=None, resume: bool = False,
               tied_head: bool = True, also: str | None = None, exclude: tuple[str, ...] = ()):
    """(params, trainable) of a training command's LoRA flags, or (None, None)
    when the run does not use LoRA (the command keeps its own parameters).
    `make_base()` gives the starting parameters, called only when needed;
    `tied_head`, `also` and `exclude` as in `apply_lora_args`.

    A fresh run: `apply_lora_args`. On `resume` of a folder with a checkpoint,
    the run's own adapters are rebuilt (layers, rank, alpha, qkv mode as saved;
    the checkpoint then restores their values), so the LoRA flags may be left
    out; a flag that is given must agree with the saved value, else a
    ValueError names the flag and the saved value. LoRA flags on a resumed run
    that trained every weight are refused too. What it does goes to stderr."""
    import sys

    from jaxllm import lora

    saved = saved_lora(run_dir) if resume and run_dir is not None else None
    if saved is None:
        if getattr(args, "lora_rank", None) is None:
            apply_lora_args(None, config, args)  # refuses --lora-alpha & co. without a rank
            return None, None
        params, trainable = apply_lora_args(make_base(), config, args, key,
                                            tied_head=tied_head, also=also, exclude=exclude)
        print(describe(params), file=sys.stderr)
        return params, trainable
    given = [f for f in ("rank", "alpha", "targets", "qkv")
             if getattr(args, f"lora_{f}", None) is not None]
    if not saved["adapters"]:
        if given:
            raise ValueError(f"--lora-{given[0]}: {run_dir} was trained without adapters (every "
                             "weight); resume it without the LoRA flags, or start a new --out")
        return None, None
    base = make_base()
    tied = bool(tied_head and config.tie_embeddings)
    layers = list(saved["adapters"])
    saved_targets = _targets_name(_without(base, exclude), layers, tied)

    def refuse(flag, value, saved_value):
        raise ValueError(f"--lora-{flag} {value}: {run_dir} was trained with --lora-{flag} "
                         f"{saved_value}; drop the flag to resume with the run's own adapters, "
                         "or start a new --out")

    if args.lora_rank is not None and args.lora_rank != saved["rank"]:
        refuse("rank", args.lora_rank, saved["rank"] or "(ranks differing per layer)")
    if args.lora_alpha is not None and (saved["alpha"] is None
                                        or abs(args.lora_alpha - saved["alpha"]) > 1e-6):
        refuse("alpha", f"{args.lora_alpha:g}",
               "(alphas differing per layer)" if saved["alpha"] is None else f"{saved['alpha']:g}")
    if args.lora_targets is not None:
        try:
            chosen = lora.select_targets(_without(base, exclude), args.lora_targets,
                                         tied_head=tied)
        except ValueError:
            chosen = []
        if set(chosen) != set(layers):
            refuse("targets", args.lora_targets, saved_targets)
    if args.lora_qkv is not None and saved["qkv"] is not None and args.lora_qkv != saved["qkv"]:
        refuse("qkv", args.lora_qkv, saved["qkv"])
    params = base
    for path, ab in saved["adapters"].items():  # each layer's own alpha, as saved
        params = lora.with_adapters(params, {path: ab}, saved["scales"][path] * ab["a"].shape[-1])
    alpha = "per layer" if saved["alpha"] is None else f"{saved['alpha']:g}"
    print(f"resuming the run's LoRA adapters (targets {saved_targets}, rank "
          f"{saved['rank'] or 'per layer'}, alpha {alpha}"
          + (f", qkv {saved['qkv']}" if saved["qkv"] else "") + f"); {describe(params)}",
          file=sys.stderr)
    return params, lora.trainable(also)


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
                        help="merge: a new or empty output folder; export: a new output "
                             ".safetensors file")


def run(args) -> int:
    from jaxllm import lora
    from jaxllm.hf import hf_config_kwargs, save_safetensors
    from jaxllm.train.checkpoint import load_params, read_meta

    try:
        out = Path(args.out)
        if args.action == "export" and out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists; export writes a new file (nothing is "
                             "overwritten)")
        params, config, tokenizer = load_params(args.run_dir, args.step)
        adapters, scales = lora.adapters_of(params)
        if not adapters:
            raise ValueError(f"{args.run_dir} holds no adapters (was it trained with --lora-rank?)")
        if args.action == "merge" and out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; merge writes a folder (model.safetensors "
                             "and config.json)")
        if args.action == "merge" and out.is_dir() and any(out.iterdir()):
            raise ValueError(f"--out {out} is not empty; merge writes a new folder (nothing "
                             "in another one is overwritten)")
        if args.action == "export" and out.is_dir():
            raise ValueError(f"--out {out} is a folder; export writes one file "
                             "(e.g. --out adapters.safetensors)")
        meta = read_meta(args.run_dir, args.step)
        kind = meta.get("kind")
        if args.action == "merge" and kind == "classify":
            _merge_classifier(args.run_dir, args.step, params, out)
            print(f"merged {len(adapters)} adapters into the classifier run folder {out} "
                  "(jaxllm classify --run-dir reads it)")
        elif args.action == "merge":
            merged, config = lora.merge_model(params, config)  # a tied head's adapter unties it
            out.mkdir(parents=True, exist_ok=True)
            save_safetensors(merged, config, out / "model.safetensors")
            hf = dict(hf_config_kwargs(config), model_type="gpt2",
                      architectures=["GPT2LMHeadModel"])
            hf.update(export_tokenizer(out, tokenizer, meta.get("tokenizer_dir")))
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


def export_tokenizer(out: Path, name: str, directory: str | None) -> dict:
    """The config.json entry that names a merged folder's tokenizer and where
    its files were (a byte vocabulary has none to ship, and GPT-2's files may
    be elsewhere); a Hugging Face tokenizer's files are copied in beside it."""
    import shutil

    from jaxllm.tokenizer import EXPORT_KEY, TOKENIZER_FILES

    if name == "hf" and directory:
        for f in TOKENIZER_FILES:
            if (Path(directory) / f).is_file():
                shutil.copy(Path(directory) / f, out / f)
    return {EXPORT_KEY: {"name": name, "directory": directory}}


def _merge_classifier(run_dir, step, params, out: Path) -> None:
    """A classification run's adapters folded into its weights, written as a run
    folder of its own: one checkpoint (the merged parameters, the class head
    as trained; no optimizer state) with the run's metadata, so that `jaxllm
    classify --run-dir OUT` and `jaxllm finetune classify --run-dir OUT` read
    it. (A class head is no GPT-2 LM head: a Hugging Face GPT2LMHeadModel
    folder cannot hold it.)"""
    import jax
    import jax.numpy as jnp

    from jaxllm import lora
    from jaxllm.train import checkpoint
    from jaxllm.train.step import TrainState

    if checkpoint.checkpoint_dir(out).is_dir():
        raise ValueError(f"{out} already holds checkpoints; give a new folder")
    meta = checkpoint.read_meta(run_dir, step)
    merged = lora.merge(params)
    meta = dict(meta, merged_from=str(run_dir))
    saved_step = int(meta.pop("step", meta.get("data_position", 0)))
    state = TrainState(step=jnp.asarray(saved_step, jnp.int32), params=merged,
                       opt_state={}, rng=jax.random.key_data(jax.random.key(0)))
    manager = checkpoint.open_manager(out, create=True)
    try:
        checkpoint.save(manager, state, meta)
    finally:
        manager.close()
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
