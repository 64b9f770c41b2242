"""`jaxllm finetune dpo`: preference tuning (DPO) on chosen / rejected answer pairs.

    jaxllm finetune dpo --run-dir runs/instruct --data instruction-data-with-preference.json
    jaxllm finetune dpo --hf path/to/gpt2-medium --data prefs.jsonl --beta 0.1 --logprob sum
    jaxllm finetune dpo --run-dir runs/instruct --data prefs.json --protocol book
    jaxllm finetune dpo ... --lora-rank 16 --lora-alpha 16     # adapters only; the
                                                              # reference is the base

The reference is the starting model, frozen: its log-probabilities of every
pair are computed once before training and kept in the run folder. By default
(`--protocol default`), answers end in a scored end-of-text and AdamW runs at a
constant 5e-6 (weight decay 0.01 on the weight matrices, no clipping), batches
of 8, 1 epoch, an evaluation every 5 steps on 5 batches, beta 0.1, mean
log-probabilities. `--protocol book` is the book's notebook in every setting:
its collate (no end-of-text; the 2 tokens after the instruction part left
out of the masks) and weight decay on every parameter, as torch's AdamW does.
`--set key=value` reaches any field of GPTConfig, TrainConfig or DPOConfig.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxllm.cli.finetune_start import (add_run_arguments, add_start_arguments, load_start,
                                       parse_overrides, total_steps)

DEFAULT_OUT = "runs/dpo"
# Each protocol's TrainConfig fields over `TrainConfig.torch_adamw` (betas 0.9 / 0.999, no
# warm-up, a constant lr, no clipping), and its DPOConfig fields. The book's notebook is
# torch.optim.AdamW(model.parameters(), lr=5e-6, weight_decay=0.01), batches of 8, 1 epoch.
TRAIN_PROTOCOLS = {
    "default": dict(lr=5e-6, weight_decay=0.01, batch_size=8, weight_decay_on="matrices"),
    "book": dict(lr=5e-6, weight_decay=0.01, batch_size=8, weight_decay_on="all"),
}
PROTOCOLS = {"default": {}, "book": dict(book_collate=True, beta=0.1,
                                         logprob="mean", eval_every=5, eval_batches=5)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_start_arguments(parser)
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="preference data: a JSON list or JSON Lines (.jsonl) of "
                             "{instruction, input, chosen, rejected}")
    parser.add_argument("--limit", type=int, metavar="N", help="use only the first N entries")
    parser.add_argument("--beta", type=float, help="DPO's beta (default 0.1)")
    parser.add_argument("--logprob", choices=("mean", "sum"),
                        help="a sequence's log-probability: the mean over the answer's tokens "
                             "(the book; rewards without beta) or the sum (TRL; rewards with "
                             "beta); default mean")
    parser.add_argument("--style", choices=("alpaca", "chat", "template"),
                        help="prompt format (default: the --run-dir run's own, else alpaca)")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="default",
                        help="book: the book's notebook in every setting")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the training split")
    parser.add_argument("--steps", type=int, help="optimizer steps (instead of --epochs)")
    parser.add_argument("--eval-every", type=int, help="steps between evaluations (default 5)")
    parser.add_argument("--save-every", type=int, help="steps between checkpoints (default 100)")
    parser.add_argument("--max-new-tokens", type=int,
                        help="longest test response, in tokens (default 256)")
    parser.add_argument("--no-responses", action="store_true",
                        help="skip answering the test split after training")
    add_run_arguments(parser, default_out=DEFAULT_OUT, task_config="DPOConfig")


def build(args):
    """Everything `run` needs, checked: (config, tc, dc, tokenizer, entries, params, source)."""
    from jaxllm.data.preferences import read_preferences, split_preferences
    from jaxllm.finetune.dpo_run import DPOConfig
    from jaxllm.train.optim import TrainConfig
    from jaxllm.train.runner import check_run_folder

    overrides = parse_overrides(args.overrides, "dpo", DPOConfig)
    check_run_folder(args.out, resume=args.resume, kind="dpo")  # before any work
    if not os.path.exists(args.data):  # before any weights are read
        raise FileNotFoundError(f"--data {args.data}: no such file")
    params, config, tokenizer, source, kind = load_start(args, overrides["model"])
    if kind == "classify":
        raise ValueError(f"--run-dir {args.run_dir} is a classifier (its LM head was replaced by "
                         "a class head); DPO starts from a language model")
    entries = read_preferences(args.data)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        entries = entries[:args.limit]
    fields = dict(PROTOCOLS[args.protocol])
    for flag, key in (("beta", "beta"), ("logprob", "logprob"), ("style", "style"),
                      ("eval_every", "eval_every"), ("save_every", "save_every"),
                      ("max_new_tokens", "response_tokens")):
        if getattr(args, flag) is not None:
            fields[key] = getattr(args, flag)
    if args.style is None and args.run_dir is not None and "style" not in overrides["dpo"] \
            and not fields.get("book_collate"):
        from jaxllm.finetune.instruct_run import prompt_style_of

        fields["style"] = prompt_style_of(args.run_dir)  # the format the run was tuned in
    if args.no_responses:
        fields["responses"] = False
    fields.update(overrides["dpo"])
    dc = DPOConfig(**fields)
    train_fields = {**TRAIN_PROTOCOLS[args.protocol], **overrides["train"]}
    train_fields["total_steps"] = total_steps(args, train_fields,
                                              len(split_preferences(entries)[0]), "pairs")
    tc = TrainConfig.torch_adamw(**train_fields)
    return config, tc, dc, tokenizer, entries, params, source


def run(args) -> int:
    from jaxllm.cli.run_options import mesh_from_args, run_training

    def body() -> str:
        from jaxllm.cli.finetune_instruct import _lora
        from jaxllm.config import count_params
        from jaxllm.finetune.dpo_run import finetune_dpo, format_summary

        mesh, rules = mesh_from_args(args)
        config, tc, dc, tokenizer, entries, params, source = build(args)
        print(f"{args.data}: {len(entries):,} preference pairs; model {config.n_layers} layers x "
              f"{config.emb_dim} ({count_params(config):,} parameters) from {source}; "
              f"{tc.total_steps} steps of {tc.batch_size}; beta {dc.beta}, {dc.logprob} "
              f"log-probabilities; run folder {args.out}", file=sys.stderr)
        params, trainable, lora = _lora(args, config, tc, params)
        return format_summary(finetune_dpo(
            args.out, config, tc, dc, tokenizer, entries, params=params,
            fallback=not args.no_fallback, resume=args.resume, progress=not args.quiet,
            trainable=trainable, lora=lora, mesh=mesh, partition_rules=rules,
            data_name=os.path.basename(args.data), source=source))

    return run_training("finetune dpo", body)


def main(argv: list[str] | None = None) -> int:
    """`python -m jaxllm.cli.finetune_dpo ...`: the command on its own."""
    from jaxllm.cli.finetune import task_parser

    return run(task_parser("dpo").parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
