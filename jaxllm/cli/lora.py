"""`jaxllm lora`: fold a LoRA run's adapters into its weights, or write them alone.

    jaxllm lora merge  --run-dir runs/lora --out exported/   # model.safetensors + config.json
    jaxllm lora export --run-dir runs/lora --out adapters.safetensors   # the adapters only

`merge` writes the merged model as a Hugging Face folder of its family
(`jaxllm.save_hf`: GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM;
`jaxllm generate --hf exported/` reads it, and so does `transformers`); an adapter on
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
`--lora-rank`, `--lora-alpha`, `--lora-scale`, `--lora-init`,
`--lora-targets`, `--lora-qkv` flags) and `lora_start(...)`, which returns
the parameters with adapters (fresh, or on --resume the run's own), the
`trainable` regex to train them alone, and the record of the choices that the
run keeps in its metadata (`meta["lora"]`): rank, alpha, the scale and init
conventions (`jaxllm.lora.SCALES`, `INITS`), targets and qkv mode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, NamedTuple

ACTIONS = ("merge", "export")
QKV_MODES = ("split", "fused")
FLAGS = ("rank", "alpha", "scale", "init", "targets", "qkv")


class LoraStart(NamedTuple):
    """What `lora_start` gives a training command."""

    params: Any  # the parameters with adapters; None without LoRA
    trainable: str | None  # the trainable regex; None without LoRA
    record: dict | None  # the run's LoRA choices, for its metadata; None without LoRA


def scale_arg(text: str):
    """--lora-scale: a convention name of `jaxllm.lora.SCALES`, or a number."""
    from jaxllm import lora

    if text in lora.SCALES:
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a convention ({', '.join(sorted(lora.SCALES))}) nor a "
            "number") from None
    try:
        lora.check_scale(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    """The LoRA flags of a training command; off unless --lora-rank is given
    (or --resume finds a LoRA run)."""
    group = parser.add_argument_group("LoRA (low-rank adapters; jaxllm.lora)")
    group.add_argument("--lora-rank", type=int, default=None, metavar="R",
                       help="train rank-R adapters on frozen weights instead of every weight; "
                            "--resume continues a LoRA run without the flags")
    group.add_argument("--lora-alpha", type=float, default=None,
                       help="adapter alpha (default: the rank); the adapter path is multiplied "
                            "by alpha / rank, or by alpha with --lora-scale book")
    group.add_argument("--lora-scale", type=scale_arg, default=None, metavar="CONVENTION",
                       help="peft (default: alpha / rank, as PEFT and the appendix-E notebook), "
                            "book (alpha, no division: the book's appendix_e.py), or a number "
                            "(the scale itself)")
    group.add_argument("--lora-init", default=None, choices=("peft", "book"),
                       help="A's initial draw: peft (default: U(+-1/sqrt(in)), as PEFT) or book "
                            "(U(+-1/sqrt(rank)): the book's kaiming_uniform_ on A (in, rank))")
    group.add_argument("--lora-targets", default=None, metavar="WHICH",
                       help="dense layers to adapt: attn, ffn, head (the LM head, tied or not), "
                            "all (default), a layer's name in every block (GPT-2: qkv, out, fc, "
                            "proj; Llama and Qwen3: q, k, v, o, gate, up, down), several joined "
                            "by commas, or a regex over paths such as blocks/0/attn/qkv")
    group.add_argument("--lora-qkv", default=None, choices=QKV_MODES,
                       help="q, k and v as three adapters (split, default) or one on the fused "
                            "projection (fused, as PEFT on GPT-2's c_attn)")


def apply_lora_args(params, config, args, key=None, *, tied_head: bool = True,
                    also: str | None = None, exclude: tuple[str, ...] = (),
                    defaults: dict | None = None):
    """(params, trainable, record): with --lora-rank, the parameters with fresh
    adapters, `jaxllm.lora.trainable(also)` (the adapters, plus the leaves `also`
    matches: a new task head) and the record of the choices; without it,
    `params` as they are and None, None (train everything). `key` (default:
    key 0) draws the adapters' A; `tied_head=False` leaves a tied LM head out
    and `exclude` the top-level entries named (a model that replaces its LM
    head: "out_head", a task head). `defaults` holds the values a protocol
    gives the flags left out ({"scale": "book", "targets": ..., "init": ...},
    and "allow_rank_above_dim": True to adapt a layer narrower than the rank
    without a warning)."""
    rank = getattr(args, "lora_rank", None)
    if rank is None:
        for flag in FLAGS[1:]:
            if getattr(args, f"lora_{flag.replace('-', '_')}", None) is not None:
                raise ValueError(f"--lora-{flag} needs --lora-rank")
        return params, None, None
    import jax

    from jaxllm import lora

    defaults = defaults or {}
    choice = {f: getattr(args, f"lora_{f}", None) for f in FLAGS[1:]}
    choice = {f: defaults.get(f) if v is None else v for f, v in choice.items()}
    targets, qkv = choice["targets"] or "all", choice["qkv"] or "split"
    scale, init = choice["scale"] or "peft", choice["init"] or "peft"
    alpha = float(rank if choice["alpha"] is None else choice["alpha"])
    key = jax.random.key(0) if key is None else key
    with warnings.catch_warnings(record=True) as caught:  # a rank above a layer's size
        warnings.simplefilter("always")
        adapters = lora.init_lora(_without(params, exclude), config, key, rank=rank,
                                  targets=targets, qkv=qkv, tied_head=tied_head, init=init,
                                  allow_rank_above_dim=bool(defaults.get("allow_rank_above_dim")))
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    record = {"rank": rank, "alpha": alpha, "scale": scale, "init": init,
              "targets": targets, "qkv": qkv,
              "layers": len(adapters), "parameters": lora.count_lora_params(adapters)}
    return lora.with_adapters(params, adapters, alpha, scale), lora.trainable(also), record


def _without(params, exclude):
    return {k: v for k, v in params.items() if k not in exclude} if exclude else params


def saved_lora(run_dir) -> dict | None:
    """What the latest checkpoint of a run folder holds of LoRA: None when there
    is no checkpoint; else {"adapters": {path: {"a", "b"}}, "scales", "rank",
    "alpha", "scale", "init", "qkv"}: rank and alpha None when they differ
    between layers, qkv None without a qkv adapter, "adapters" empty for a run
    that trained every weight. The scale and init conventions are the run's
    record (`meta["lora"]`); a run from before it was kept has scale "peft" and
    init None (unknown). The parameters are read to get each adapter's scale."""
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
    params, meta = checkpoint.load_params_and_meta(run_dir, report=lambda line: None)
    record = meta.get("lora") or {}
    adapters, scales = lora.adapters_of(params)
    convention = record.get("scale", "peft")
    ranks = {int(ab["a"].shape[-1]) for ab in adapters.values()}
    if isinstance(convention, str):
        alphas = {round(scales[p] * (ab["a"].shape[-1] if convention == "peft" else 1), 6)
                  for p, ab in adapters.items()}
    else:  # an explicit scale: the run's alpha is what it recorded
        alphas = {record.get("alpha")}
    modes = {"split" if ab["a"].ndim == 3 else "fused" for p, ab in adapters.items()
             if p.rsplit("/", 1)[-1] == "qkv"}
    one = (lambda xs: next(iter(xs)) if len(xs) == 1 else None)
    return {"adapters": adapters, "scales": scales, "alpha": one(alphas), "rank": one(ranks),
            "qkv": one(modes), "scale": convention, "init": record.get("init")}


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
               tied_head: bool = True, also: str | None = None, exclude: tuple[str, ...] = (),
               defaults: dict | None = None) -> LoraStart:
    """`LoraStart(params, trainable, record)` of a training command's LoRA flags,
    or (None, None, None) when the run does not use LoRA (the command keeps its
    own parameters). `make_base()` gives the starting parameters, called only
    when needed; `tied_head`, `also`, `exclude` and `defaults` as in
    `apply_lora_args`.

    A fresh run: `apply_lora_args`. On `resume` of a folder with a checkpoint,
    the run's own adapters are rebuilt (layers, rank, each layer's scale, qkv
    mode as saved; the checkpoint then restores their values), so the LoRA
    flags may be left out; a flag that is given must agree with the saved
    value (alpha and --lora-scale by the scale they give), else a ValueError
    names the flag and the saved value. LoRA flags on a resumed run that
    trained every weight are refused too. What it does goes to stderr."""
    import sys

    from jaxllm import lora

    saved = saved_lora(run_dir) if resume and run_dir is not None else None
    if saved is None:
        if getattr(args, "lora_rank", None) is None:
            apply_lora_args(None, config, args)  # refuses --lora-alpha & co. without a rank
            return LoraStart(None, None, None)
        params, trainable, record = apply_lora_args(
            make_base(), config, args, key, tied_head=tied_head, also=also, exclude=exclude,
            defaults=defaults)
        print(f"{describe(params)} (scale {_scale_text(record)}, init {record['init']})",
              file=sys.stderr)
        return LoraStart(params, trainable, record)
    asked = {f: getattr(args, f"lora_{f}", None) for f in FLAGS}
    given = [f for f in FLAGS if asked[f] is not None]
    if not saved["adapters"]:
        if given:
            raise ValueError(f"--lora-{given[0]}: {run_dir} was trained without adapters (every "
                             "weight); resume it without the LoRA flags, or start a new --out")
        return LoraStart(None, None, None)
    base = make_base()
    tied = bool(tied_head and config.tie_embeddings)
    layers = list(saved["adapters"])
    saved_targets = _targets_name(_without(base, exclude), layers, tied)

    def refuse(flag, value, saved_value):
        raise ValueError(f"--lora-{flag} {value}: {run_dir} was trained with --lora-{flag} "
                         f"{saved_value}; drop the flag to resume with the run's own adapters, "
                         "or start a new --out")

    if asked["rank"] is not None and asked["rank"] != saved["rank"]:
        refuse("rank", asked["rank"], saved["rank"] or "(ranks differing per layer)")
    if asked["alpha"] is not None or asked["scale"] is not None:
        scale = saved["scale"] if asked["scale"] is None else asked["scale"]
        alpha = asked["alpha"] if asked["alpha"] is not None else (
            saved["alpha"] if saved["alpha"] is not None else saved["rank"])
        wanted = {p: lora.lora_scale(alpha, ab["a"].shape[-1], scale)
                  for p, ab in saved["adapters"].items()}
        if any(abs(wanted[p] - saved["scales"][p]) > 1e-6 * max(1.0, abs(wanted[p]))
               for p in wanted):
            if asked["scale"] is not None and asked["scale"] != saved["scale"]:
                refuse("scale", asked["scale"], saved["scale"])
            refuse("alpha", f"{asked['alpha']:g}", "(alphas differing per layer)"
                   if saved["alpha"] is None else f"{saved['alpha']:g}")
    if asked["init"] is not None and saved["init"] is not None \
            and asked["init"] != saved["init"]:
        refuse("init", asked["init"], saved["init"])
    if asked["targets"] is not None:
        try:
            chosen = lora.select_targets(_without(base, exclude), asked["targets"],
                                         tied_head=tied)
        except ValueError:
            chosen = []
        if set(chosen) != set(layers):
            refuse("targets", asked["targets"], saved_targets)
    if asked["qkv"] is not None and saved["qkv"] is not None and asked["qkv"] != saved["qkv"]:
        refuse("qkv", asked["qkv"], saved["qkv"])
    params = base
    for path, ab in saved["adapters"].items():  # each layer's own scale, as saved
        params = lora.with_adapters(params, {path: ab}, None, saved["scales"][path])
    record = {"rank": saved["rank"], "alpha": saved["alpha"], "scale": saved["scale"],
              "init": saved["init"], "targets": saved_targets, "qkv": saved["qkv"],
              "layers": len(layers), "parameters": lora.count_lora_params(saved["adapters"])}
    alpha = "per layer" if saved["alpha"] is None else f"{saved['alpha']:g}"
    print(f"resuming the run's LoRA adapters (targets {saved_targets}, rank "
          f"{saved['rank'] or 'per layer'}, alpha {alpha}, scale {_scale_text(record)}"
          + (f", qkv {saved['qkv']}" if saved["qkv"] else "") + f"); {describe(params)}",
          file=sys.stderr)
    return LoraStart(params, lora.trainable(also), record)


def _scale_text(record) -> str:
    scale = record["scale"]
    if not isinstance(scale, str):
        return f"{scale:g}"
    return f"{scale}: {'alpha / rank' if scale == 'peft' else 'alpha'}"


def describe(params) -> str:
    """'LoRA: N adapters, M trainable parameters' for a tree with adapters."""
    from jaxllm import lora

    adapters, _ = lora.adapters_of(params)
    return (f"LoRA: {len(adapters)} adapted dense layers, "
            f"{lora.count_lora_params(adapters):,} trainable parameters")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=ACTIONS,
                        help="merge: the run's adapters folded into its weights, as a Hugging "
                             "Face folder of the model's family; export: the adapters alone, "
                             "one safetensors file")
    parser.add_argument("--run-dir", required=True, metavar="RUN",
                        help="a run trained with --lora-rank (its latest checkpoint)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    parser.add_argument("--out", required=True, metavar="PATH",
                        help="merge: a new or empty output folder; export: a new output "
                             ".safetensors file")


def run(args) -> int:
    from jaxllm import lora
    from jaxllm.hf import save_hf
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
            save_hf(out, merged, config)  # GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM
            hf = json.loads((out / "config.json").read_text())
            hf.update(export_tokenizer(out, tokenizer, meta.get("tokenizer_dir")))
            (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
            print(f"merged {len(adapters)} adapters into {out / 'model.safetensors'}")
        else:
            record = read_meta(args.run_dir, args.step).get("lora") or {}
            scale, init = record.get("scale", "peft"), record.get("init")
            per = {p: 1 if scale == "book" else ab["a"].shape[-1] for p, ab in adapters.items()}
            if isinstance(scale, str):
                alphas = {round(scales[p] * per[p], 6) for p in adapters}
            else:  # an explicit scale: every layer has it
                alphas = {record.get("alpha")} if len(set(scales.values())) == 1 else set()
            if len(alphas) != 1:
                raise ValueError(f"the adapters of {args.run_dir} have different scales "
                                 f"{sorted(set(scales.values()))}")
            if out.parent:
                os.makedirs(out.parent, exist_ok=True)
            lora.save_adapters(out, adapters, alphas.pop(), config, scale=scale, init=init,
                               tokenizer=tokenizer, run_dir=str(args.run_dir))
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
    if "lora" in meta:  # no adapters left: their record stays, as what was merged
        meta["merged_lora"] = meta.pop("lora")
    saved_step = int(meta.pop("step", meta.get("data_position", 0)))
    state = TrainState(step=jnp.asarray(saved_step, jnp.int32), params=merged,
                       opt_state={}, rng=jax.random.key_data(jax.random.key(0)))
    manager = checkpoint.open_manager(out, create=True)
    try:
        checkpoint.save(manager, state, meta)
    finally:
        manager.close()
    (out / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
