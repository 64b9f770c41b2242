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
columns). In a tab-separated file `"` is text unless `--quotes` (or
`--protocol book`, which reads the file as the book's pandas call does); in a
CSV a quoted field that spans lines is warned of. Any number of classes, numbered in sorted label order (or in the
order `--classes` gives, which also refuses any other label). Rows are
balanced (every class undersampled to the smallest), shuffled and split
70 / 10 / 20 with `--data-seed` (default 123), padded with <|endoftext|> to
the longest training text.

Defaults are the book's chapter-6 protocol (torch's AdamW at a constant
5e-5, weight decay 0.1, betas 0.9 / 0.999, no warm-up, no clipping, batches
of 8, seed 123, 5 epochs, the last block, the final LayerNorm and the head
trained, an evaluation every 50 steps on 5 batches) except two choices: the
logits are read at the last real token of each row (`--pooling last_token`)
and weight decay skips biases and LayerNorm parameters. `--protocol book`
restores both (`last_position`, decay on every trained parameter). `--set
key=value` reaches any field of GPTConfig, TrainConfig or ClassifyConfig.

With `--lora-rank` (and `--lora-alpha`, `--lora-scale`, `--lora-init`,
`--lora-targets`, `--lora-qkv`) dense layers take LoRA adapters
(`jaxllm.lora`) and every pretrained weight stays frozen. By default the
blocks' layers are adapted and the new class head trains in full beside
them, with whatever `--trainable` adds (`all` is refused). Targets that
select the class head (`all`, `head`, a regex) put an adapter on it too, and
then the adapters alone train unless `--trainable` names more. With
`--protocol book` the LoRA flags reproduce the book's appendix E
(`--lora-rank 16 --lora-alpha 16`: 2,666,528 trained parameters on GPT-2
124M): adapters on every linear layer, the 768 x 2 class head included (a
rank above a layer's size is the book's choice there, elsewhere a warning),
the head's own weights frozen, scale alpha and A's init the book's (`--lora-scale book
--lora-init book`), lr 8e-4. `--resume` continues with the run's own adapters.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from jaxllm.cli.finetune_start import (add_run_arguments, add_start_arguments, load_start,
                                       parse_overrides, total_steps)

DEFAULT_OUT = "runs/classify"
# Each protocol: TrainConfig fields over `TrainConfig.torch_adamw` (betas 0.9 / 0.999, no
# warm-up, a constant lr, no clipping, decay on every parameter), ClassifyConfig fields, and
# with --lora-rank the train fields and LoRA defaults that replace them. The book's
# chapter 6 is torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1), batches of
# 8, torch.manual_seed(123), 5 epochs, logits at [:, -1, :]; its appendix E is
# lr=8e-4 with rank-16 adapters (alpha 16, no division) on every linear layer, the
# class head's too, and nothing else trained.
PROTOCOLS = {
    "default": {"train": dict(lr=5e-5, weight_decay=0.1, batch_size=8, seed=123,
                              weight_decay_on="matrices"),
                "classify": {}, "lora_train": {}, "lora": dict(targets="attn,ffn")},
    "book": {"train": dict(lr=5e-5, weight_decay=0.1, batch_size=8, seed=123,
                           weight_decay_on="all"),
             "classify": dict(pooling="last_position", trainable="last_block", eval_every=50,
                              eval_batches=5),
             "lora_train": dict(lr=8e-4),
             "lora": dict(targets="all", scale="book", init="book", allow_rank_above_dim=True,
                          trainable=None)},
}
EPOCHS = 5.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_start_arguments(parser)
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="labelled texts: label<TAB>text lines, or a CSV with a header")
    parser.add_argument("--label-column", metavar="NAME",
                        help="header name of the label column (the file then has a header)")
    parser.add_argument("--text-column", metavar="NAME",
                        help="header name of the text column (the file then has a header)")
    parser.add_argument("--classes", metavar="A,B,...",
                        help="the valid labels, in class-id order (default: every label the "
                             "file has, sorted); a row with any other label is an error")
    parser.add_argument("--quotes", action="store_true",
                        help='read " as a quote character in a tab-separated file too, as '
                             "pandas does (the book's read of the SMS Spam Collection; on with "
                             "--protocol book); a .csv always quotes")
    parser.add_argument("--no-balance", action="store_true",
                        help="keep every row instead of undersampling to the smallest class")
    parser.add_argument("--data-seed", type=int, default=123,
                        help="seed of the balance and split draws (default 123, the book's)")
    parser.add_argument("--max-length", type=int, metavar="N",
                        help="tokens per row (default: the longest training text)")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="default",
                        help="book: the book's settings in every hyperparameter: chapter 6 "
                             "(last_position pooling, decay on every trained parameter), and "
                             "with --lora-rank appendix E (adapters on every linear layer and "
                             "the class head, the book's scale and init, lr 8e-4)")
    parser.add_argument("--trainable", metavar="WHICH",
                        help="head, last_block (default: the head, last block and final "
                             "LayerNorm), all, or a regex over parameter paths")
    parser.add_argument("--pooling", choices=("last_token", "last_position", "mean"),
                        help="where the class logits are read (default last_token)")
    parser.add_argument("--epochs", type=float, default=EPOCHS,
                        help="passes over the training split (the book's number)")
    parser.add_argument("--steps", type=int, help="optimizer steps (instead of --epochs)")
    parser.add_argument("--eval-every", type=int, help="steps between evaluations (default 50)")
    parser.add_argument("--eval-batches", type=int, help="batches per evaluation (default 5)")
    parser.add_argument("--save-every", type=int, help="steps between checkpoints (default 500)")
    parser.add_argument("--keep-best", action="store_true",
                        help="also keep the parameters of the evaluation with the best "
                             "validation accuracy, in RUN_DIR/best (its step in summary.json)")
    add_run_arguments(parser, default_out=DEFAULT_OUT, task_config="ClassifyConfig")


def _classes(args) -> list[str] | None:
    if args.classes is None:
        return None
    classes = [c.strip() for c in args.classes.split(",")]
    if not all(classes):
        raise ValueError(f"--classes {args.classes!r}: an empty label")
    return classes


def build(args):
    """Everything `run` needs, checked: (config, tc, cc, data, tokenizer, params, source)."""
    from jaxllm.data.classification import prepare_classification
    from jaxllm.finetune.classify_run import ClassifyConfig
    from jaxllm.train.optim import TrainConfig
    from jaxllm.train.runner import check_run_folder

    overrides = parse_overrides(args.overrides, "classify", ClassifyConfig)
    check_run_folder(args.out, resume=args.resume, kind="classify")  # before any work
    if not os.path.exists(args.data):  # before any weights are read
        raise FileNotFoundError(f"--data {args.data}: no such file")
    params, config, tokenizer, source, _ = load_start(args, overrides["model"])
    protocol = PROTOCOLS[args.protocol]
    cc_fields = dict(protocol["classify"])
    for flag, key in (("trainable", "trainable"), ("pooling", "pooling"),
                      ("eval_every", "eval_every"), ("eval_batches", "eval_batches"),
                      ("save_every", "save_every")):
        if getattr(args, flag) is not None:
            cc_fields[key] = getattr(args, flag)
    if args.keep_best:
        cc_fields["keep_best"] = True
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
                                      max_length=args.max_length, classes=_classes(args),
                                      label_column=args.label_column,
                                      text_column=args.text_column, pad_id=tokenizer.eot_id,
                                      quotes=True if args.quotes or args.protocol == "book"
                                      else None)
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    lora = args.lora_rank is not None or _resumes_lora(args)
    train_fields = {**protocol["train"], **(protocol["lora_train"] if lora else {}),
                    **overrides["train"]}
    train_fields["total_steps"] = total_steps(args, train_fields, len(data.train), "rows")
    tc = TrainConfig.torch_adamw(**train_fields)
    asked = args.trainable if args.trainable is not None else overrides["classify"].get(
        "trainable")
    params, cc, record = _lora(args, config, tc, cc, params, asked, len(data.classes),
                               protocol["lora"])
    return config, tc, cc, data, tokenizer, params, source, record


def _resumes_lora(args) -> bool:
    """Whether --resume continues a LoRA run (its metadata records adapters)."""
    from jaxllm.train.checkpoint import read_meta

    if not args.resume:
        return False
    try:
        return bool(read_meta(args.out).get("lora"))
    except (FileNotFoundError, ValueError):
        return False


def _lora(args, config, tc, cc, params, trainable: str | None, n_classes: int,
          defaults: dict):
    """(params, cc, record) for LoRA: the starting weights with adapters (on
    the layers the targets select; the class head among them when they select
    it, drawn here as the loop would), `cc.trainable` the adapters plus the
    leaves `trainable` names (default: the class head, unless it has an adapter
    or the protocol trains the adapters alone), and the record of the LoRA
    choices; (params, cc, None) without LoRA."""
    import dataclasses

    import jax

    from jaxllm import lora
    from jaxllm.cli.lora import lora_start
    from jaxllm.finetune.classify import HEAD, add_class_head, trainable_for
    from jaxllm.model import init_params

    k_model, k_head = jax.random.split(jax.random.key(tc.seed))  # the loop's own draws

    def base():
        model = init_params(config, k_model, scheme=tc.init) if params is None else params
        return model if HEAD in model else add_class_head(model, config, n_classes, k_head)

    start = lora_start(base, config, args, jax.random.fold_in(jax.random.key(tc.seed), 1),
                       run_dir=args.out, resume=args.resume, tied_head=False,
                       exclude=("out_head",), defaults=defaults)
    if start.trainable is None:
        return params, cc, None
    if trainable is not None:
        also = trainable_for(trainable, config)
        if also is None:
            raise ValueError("--trainable all trains every weight, adapters or not: drop the "
                             "LoRA flags, or name what trains beside the adapters (head, "
                             "last_block, a regex)")
    elif defaults.get("trainable", "head") and HEAD not in lora.adapters_of(start.params)[0]:
        also = trainable_for("head", config)  # a new head without an adapter trains in full
    else:
        also = None
    return (start.params, dataclasses.replace(cc, trainable=lora.trainable(also)),
            start.record)


def run(args) -> int:
    from jaxllm.cli.run_options import mesh_from_args, run_training

    def body() -> str:
        from jaxllm.config import count_params
        from jaxllm.finetune.classify_run import finetune_classify, format_summary

        mesh, rules = mesh_from_args(args)
        config, tc, cc, data, tokenizer, params, source, lora = build(args)
        info = data.info
        per_class = ", ".join(f"{c} {n:,}" for c, n in info["per_class"].items())
        print(f"{args.data}: {info['rows']:,} rows ({per_class}); "
              f"{info['train']:,} train / {info['validation']:,} validation / {info['test']:,} "
              f"test, {data.max_length} tokens per row; model {config.n_layers} layers x "
              f"{config.emb_dim} ({count_params(config):,} parameters) from {source}; "
              f"{tc.total_steps} steps of {tc.batch_size}; run folder {args.out}",
              file=sys.stderr)
        return format_summary(finetune_classify(
            args.out, config, tc, cc, data, tokenizer_name=tokenizer.name,
            tokenizer_dir=tokenizer.directory, fallback=not args.no_fallback, params=params,
            resume=args.resume, progress=not args.quiet, mesh=mesh, partition_rules=rules,
            data_name=os.path.basename(args.data), source=source, lora=lora))

    return run_training("finetune classify", body)


def main(argv: list[str] | None = None) -> int:
    from jaxllm.cli.finetune import task_parser

    parser = task_parser("classify")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
