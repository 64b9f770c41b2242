"""`jaxllm finetune classify`: a GPT fine-tuned as a text classifier.

    jaxllm finetune classify --hf path/to/gpt2 --protocol book \\
        --data sms_spam_collection.tsv --tokenizer-dir shared/data   # the book's chapter 6
    jaxllm finetune classify --init random --preset small --tokenizer gpt2 \\
        --data spam.tsv --steps 200                                   # a small model, offline
    jaxllm finetune classify --run-dir runs/pretrain --data reviews.csv \\
        --label-column sentiment --text-column review --trainable all
    jaxllm finetune classify ... --out runs/classify --resume
    jaxllm finetune classify --hf gpt2 --data spam.tsv --lora-rank 8    # adapters + the head

The data is a headerless `label<TAB>text` file, or a file with a header row
(any `.csv`, or any file once `--label-column` / `--text-column` name the
columns): any number of classes, numbered in sorted label order. Rows are
balanced (every class undersampled to the smallest), shuffled and split
70 / 10 / 20 with `--data-seed` (default 123), padded with <|endoftext|> to
the longest training text.

Defaults are the book's protocol (AdamW at a constant 5e-5, weight decay
0.1, betas 0.9 / 0.999, no clipping, batches of 8, 5 epochs, the last block,
the final LayerNorm and the head trained, an evaluation every 50 steps on 5
batches) except two choices: the logits are read at the last real token of
each row (`--pooling last_token`) and weight decay skips biases and LayerNorm
parameters. `--protocol book` restores both (`last_position`, decay on every
trained leaf). `--set key=value` reaches any field of GPTConfig, TrainConfig
or ClassifyConfig.

With `--lora-rank` (and `--lora-alpha`, `--lora-targets`, `--lora-qkv`) the
blocks' dense layers take LoRA adapters (`jaxllm.lora`) and every pretrained
weight stays frozen; the new class head trains in full beside them, with
whatever `--trainable` adds (default: the head alone; `all` is refused). The
LM head is replaced, so it takes no adapter: `--lora-targets all` is the
blocks. `--resume` continues with the run's own adapters.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import warnings
from typing import Any

DEFAULT_OUT = "runs/classify"
# The book's settings, where they differ from TrainConfig's pretraining defaults.
TRAIN_PROTOCOL = dict(lr=5e-5, weight_decay=0.1, batch_size=8, warmup_steps=0, min_lr_ratio=1.0,
                      beta2=0.999, grad_clip=None, seed=123)
PROTOCOLS = {"default": {}, "book": dict(pooling="last_position", decay_all=True)}
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", metavar="DIR",
                        help="start from Hugging Face GPT-2 weights: a folder with "
                             "model.safetensors or pytorch_model.bin (and config.json), or a "
                             "model name to download (needs huggingface_hub and the network)")
    source.add_argument("--run-dir", metavar="DIR", help="start from a jaxllm run's checkpoint")
    source.add_argument("--init", choices=("random",),
                        help="start from random weights (--preset / --config, --set)")
    parser.add_argument("--preset", default=None, help="model preset for --init random "
                                                       "(default: small)")
    parser.add_argument("--config", metavar="FILE.json", help="GPTConfig JSON for --init random")
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="labelled texts: label<TAB>text lines, or a CSV with a header")
    parser.add_argument("--label-column", metavar="NAME",
                        help="header name of the label column (the file then has a header)")
    parser.add_argument("--text-column", metavar="NAME",
                        help="header name of the text column (the file then has a header)")
    parser.add_argument("--no-balance", action="store_true",
                        help="keep every row instead of undersampling to the smallest class")
    parser.add_argument("--data-seed", type=int, default=123,
                        help="seed of the balance and split draws (default 123, the book's)")
    parser.add_argument("--max-length", type=int, metavar="N",
                        help="tokens per row (default: the longest training text)")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="default",
                        help="book: the chapter-6 replay (last_position pooling, decay on "
                             "every trained leaf)")
    parser.add_argument("--trainable", metavar="WHICH",
                        help="head, last_block (default: the head, last block and final "
                             "LayerNorm), all, or a regex over parameter paths")
    parser.add_argument("--pooling", choices=("last_token", "last_position", "mean"),
                        help="where the class logits are read (default last_token)")
    parser.add_argument("--tokenizer", choices=("byte", "gpt2"),
                        help="default: gpt2 when the model's vocab_size is 50257 (and for --hf), "
                             "else byte; the run's own for --run-dir")
    parser.add_argument("--tokenizer-dir", metavar="DIR",
                        help="folder with gpt2.tiktoken (or encoder.json + vocab.bpe)")
    parser.add_argument("--epochs", type=float, default=5.0,
                        help="passes over the training split (default 5)")
    parser.add_argument("--steps", type=int, help="optimizer steps (instead of --epochs)")
    parser.add_argument("--eval-every", type=int, help="steps between evaluations (default 50)")
    parser.add_argument("--eval-batches", type=int, help="batches per evaluation (default 5)")
    parser.add_argument("--save-every", type=int, help="steps between checkpoints (default 500)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE",
                        help="any GPTConfig, TrainConfig or ClassifyConfig field (repeatable)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="RUN_DIR",
                        help=f"run folder (default {DEFAULT_OUT})")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    from jaxllm.cli.lora import add_lora_arguments

    add_lora_arguments(parser)


def _classes():
    from jaxllm.config import GPTConfig
    from jaxllm.finetune.loop import ClassifyConfig
    from jaxllm.train.optim import TrainConfig

    return {"model": GPTConfig, "train": TrainConfig, "classify": ClassifyConfig}


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """`["lr=1e-4", "pooling=mean"]` -> per-config dicts, values parsed by field type."""
    from jaxllm.cli.pretrain import parse_overrides as route

    return route(items, _classes())


def _hub_download(name: str) -> str:
    """A Hugging Face model name downloaded to the local cache; its folder."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"--hf {name}: no such folder, and huggingface_hub is not "
                                f"installed to download it as a model name") from None
    try:
        return snapshot_download(name, allow_patterns=["config.json", "model.safetensors",
                                                       "pytorch_model.bin"])
    except Exception as err:  # offline, unknown name, refused: all say the same to the user
        raise FileNotFoundError(
            f"--hf {name}: no such folder, and downloading it from the Hugging Face hub failed "
            f"({type(err).__name__}); offline, give a local folder with model.safetensors or "
            f"pytorch_model.bin and config.json") from None


def hf_state_dict(directory: str) -> dict:
    """The GPT-2 state dict of a Hugging Face folder or file, with the
    `transformer.` prefix GPT2LMHeadModel uses (GPT2Model files lack it)."""
    from jaxllm.hf import load_state_dict

    path = directory
    if os.path.isdir(directory):
        found = [f for f in ("model.safetensors", "pytorch_model.bin")
                 if os.path.exists(os.path.join(directory, f))]
        if not found:
            raise FileNotFoundError(f"--hf {directory}: the folder holds no model.safetensors "
                                    f"or pytorch_model.bin")
        path = os.path.join(directory, found[0])
    if path.endswith(".bin"):
        import torch

        sd = load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        sd = load_state_dict(path)
    if not any(k.startswith("transformer.") for k in sd):
        sd = {(k if k.startswith("lm_head.") else f"transformer.{k}"): v for k, v in sd.items()}
    return sd


def load_start(args, model_overrides: dict[str, Any]):
    """(params or None, GPTConfig, default tokenizer name, source description)."""
    from jaxllm.config import GPTConfig, get_preset

    if args.hf is not None:
        from jaxllm.cli.generate import hf_config
        from jaxllm.hf import from_hf_state_dict

        where = args.hf
        if not os.path.exists(where):
            if not HUB_NAME.match(where):
                raise FileNotFoundError(f"--hf {where}: no such file or directory")
            where = _hub_download(where)
        sd = hf_state_dict(where)  # first: a folder without weights is named as such
        if os.path.isdir(where) and not os.path.exists(os.path.join(where, "config.json")) \
                and not os.path.exists(os.path.join(where, "model.safetensors")):
            raise FileNotFoundError(f"--hf {where}: pytorch_model.bin needs its config.json")
        config = hf_config(where).replace(**model_overrides)
        return from_hf_state_dict(sd, config), config, "gpt2", f"hf:{args.hf}"
    if args.run_dir is not None:
        from jaxllm.train.checkpoint import load_params, read_meta

        if read_meta(args.run_dir).get("kind") == "classify":
            from jaxllm.finetune.loop import load_classifier

            clf = load_classifier(args.run_dir)
            return (clf["params"], clf["config"].replace(**model_overrides),
                    clf["meta"]["tokenizer"], f"run:{args.run_dir}")
        params, config, tokenizer_name = load_params(args.run_dir)
        return params, config.replace(**model_overrides), tokenizer_name, f"run:{args.run_dir}"
    if args.config and args.preset:
        raise ValueError("give --preset or --config, not both")
    config = GPTConfig.from_json(args.config) if args.config else get_preset(args.preset or "small")
    return None, config.replace(**model_overrides), None, "random"


def build(args):
    """Everything `run` needs, checked: (config, tc, cc, data, tokenizer, params, source)."""
    from jaxllm.data.classification import prepare_classification
    from jaxllm.finetune.loop import ClassifyConfig
    from jaxllm.tokenizer import get_tokenizer
    from jaxllm.train.optim import TrainConfig

    if (args.preset or args.config) and not args.init:
        raise ValueError("--preset and --config are for --init random; --hf and --run-dir bring "
                         "their own architecture")
    overrides = parse_overrides(args.overrides)
    if not os.path.exists(args.data):  # before any weights are read
        raise FileNotFoundError(f"--data {args.data}: no such file")
    params, config, default_tok, source = load_start(args, overrides["model"])
    name = args.tokenizer or default_tok or ("gpt2" if config.vocab_size == 50257 else "byte")
    tokenizer = get_tokenizer(name, args.tokenizer_dir)
    if params is None and config.vocab_size != tokenizer.vocab_size:
        if "vocab_size" in overrides["model"]:
            raise ValueError(f"vocab_size={config.vocab_size} was set, but the {tokenizer.name} "
                             f"tokenizer has {tokenizer.vocab_size} ids")
        config = config.replace(vocab_size=tokenizer.vocab_size)
    if config.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"the model's vocabulary ({config.vocab_size}) is smaller than the "
                         f"{tokenizer.name} tokenizer's ({tokenizer.vocab_size})")
    cc_fields = dict(PROTOCOLS[args.protocol])
    for flag, key in (("trainable", "trainable"), ("pooling", "pooling"),
                      ("eval_every", "eval_every"), ("eval_batches", "eval_batches"),
                      ("save_every", "save_every")):
        if getattr(args, flag) is not None:
            cc_fields[key] = getattr(args, flag)
    cc_fields.update(overrides["classify"])
    cc = ClassifyConfig(**cc_fields)
    from jaxllm.finetune.classify import trainable_for
    from jaxllm.train.task import trainable_mask

    if params is not None:  # a regex that matches nothing fails here, not after compiling
        from jaxllm.finetune.classify import HEAD, add_class_head
        import jax

        probe = params if HEAD in params else jax.eval_shape(
            lambda p: add_class_head(p, config, 2, jax.random.key(0)), params)
        trainable_mask(probe, trainable_for(cc.trainable, config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = prepare_classification(args.data, tokenizer, context_length=config.context_length,
                                      seed=args.data_seed, balanced=not args.no_balance,
                                      max_length=args.max_length, label_column=args.label_column,
                                      text_column=args.text_column, pad_id=tokenizer.eot_id)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    train_fields = {**TRAIN_PROTOCOL, **overrides["train"]}
    per_epoch = len(data.train) // train_fields["batch_size"]
    if per_epoch == 0:
        raise ValueError(f"the training split has {len(data.train)} rows, fewer than one batch "
                         f"of {train_fields['batch_size']}")
    if args.steps is not None:
        train_fields["total_steps"] = args.steps
    elif "total_steps" not in train_fields:
        if not args.epochs > 0:
            raise ValueError(f"--epochs must be > 0, got {args.epochs}")
        train_fields["total_steps"] = max(1, round(args.epochs * per_epoch))
    tc = TrainConfig(**train_fields)
    params, cc = _lora(args, config, tc, cc, params, cc_fields.get("trainable"))
    return config, tc, cc, data, tokenizer, params, source


def _lora(args, config, tc, cc, params, trainable: str | None):
    """(params, cc) for LoRA: the starting weights with adapters on the blocks,
    and `cc.trainable` the adapters plus the leaves `trainable` names (default
    the class head); (params, cc) unchanged without LoRA."""
    import dataclasses

    import jax

    from jaxllm.cli.lora import lora_start
    from jaxllm.finetune.classify import HEAD, trainable_for
    from jaxllm.model import init_params

    def base():
        if params is not None:
            return params
        k_model = jax.random.split(jax.random.key(tc.seed))[0]  # the loop's own draw
        return init_params(config, k_model, scheme=tc.init)

    also = trainable_for(trainable or "head", config)
    adapted, lora_trainable = lora_start(
        base, config, args, jax.random.fold_in(jax.random.key(tc.seed), 1), run_dir=args.out,
        resume=args.resume, tied_head=False, also=also, exclude=("out_head", HEAD))
    if lora_trainable is None:
        return params, cc
    if also is None:
        raise ValueError("--trainable all trains every weight, adapters or not: drop the LoRA "
                         "flags, or name what trains beside the adapters (head, last_block, a "
                         "regex)")
    return adapted, dataclasses.replace(cc, trainable=lora_trainable)


def run(args) -> int:
    from jaxllm.config import count_params
    from jaxllm.train.lock import RunFolderBusy
    from jaxllm.train.loop import TrainingDiverged

    try:
        config, tc, cc, data, tokenizer, params, source = build(args)
        from jaxllm.finetune.loop import finetune_classify, format_summary

        info = data.info
        per_class = ", ".join(f"{c} {n:,}" for c, n in info["per_class"].items())
        print(f"{args.data}: {info['rows']:,} rows ({per_class}); "
              f"{info['train']:,} train / {info['validation']:,} validation / {info['test']:,} "
              f"test, {data.max_length} tokens per row; model {config.n_layers} layers x "
              f"{config.emb_dim} ({count_params(config):,} parameters) from {source}; "
              f"{tc.total_steps} steps of {tc.batch_size}; run folder {args.out}",
              file=sys.stderr)
        summary = finetune_classify(args.out, config, tc, cc, data, tokenizer_name=tokenizer.name,
                                    params=params, resume=args.resume, progress=not args.quiet,
                                    data_name=os.path.basename(args.data), source=source)
    except TrainingDiverged as err:
        print(f"jaxllm finetune classify: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, RunFolderBusy) as err:
        print(f"jaxllm finetune classify: error: {err}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm finetune classify",
                                     description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
