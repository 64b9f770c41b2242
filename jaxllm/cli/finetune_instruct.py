"""`jaxllm finetune instruct`: supervised fine-tuning on instruction / response pairs.

    jaxllm finetune instruct --hf path/to/gpt2-medium --data instruction-data.json \\
        --tokenizer-dir shared/data                       # the classic protocol
    jaxllm finetune instruct --hf gpt2-medium ...         # a hub name, where the network is
    jaxllm finetune instruct --init random --preset small --tokenizer gpt2 \\
        --data instruction-data.json --steps 60           # a small model from scratch
    jaxllm finetune instruct --run-dir runs/pretrain --data my.jsonl --style chat --mask-prompt
    jaxllm finetune instruct ... --out runs/instruct --resume
    jaxllm finetune instruct --hf gpt2 --data my.json --lora-rank 16 --lora-alpha 32   # adapters only

The defaults are the book's chapter-7 protocol (torch's AdamW at a constant
5e-5, betas 0.9 / 0.999, no warm-up, no clipping, weight decay 0.1, batches
of 8, 2 epochs, an evaluation every 5 steps on 5 batches, the Alpaca
prompt, no prompt masking, rows cut to 1,024 tokens) except one choice:
weight decay falls on the weight matrices only. `--protocol book` decays
every parameter, as the book's `torch.optim.AdamW(model.parameters(),
weight_decay=0.1)` does, and seeds the batch order with the book's 123. `--set key=value` reaches any field of GPTConfig,
TrainConfig or InstructConfig.

With `--lora-rank` (and `--lora-alpha`, `--lora-targets`, `--lora-qkv`) only
LoRA adapters train (`jaxllm.lora`), the LM head (tied or not) among the
targets of `all` and `head`; `--resume` continues with the run's own adapters,
and `jaxllm lora merge` folds them into a Hugging Face folder of the model's family.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxllm.cli.finetune_start import (add_run_arguments, add_start_arguments, load_start,
                                       parse_overrides, total_steps)

DEFAULT_OUT = "runs/instruct"
# Each protocol's TrainConfig fields over `TrainConfig.torch_adamw` (betas 0.9 / 0.999, no
# warm-up, a constant lr, no clipping, decay on every parameter). The book's chapter 7 is
# torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.1), batches of 8,
# torch.manual_seed(123), 2 epochs; InstructConfig's defaults are its other settings.
PROTOCOLS = {
    "default": dict(lr=5e-5, weight_decay=0.1, batch_size=8, weight_decay_on="matrices"),
    "book": dict(lr=5e-5, weight_decay=0.1, batch_size=8, seed=123, weight_decay_on="all"),
}
EPOCHS = 2.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_start_arguments(parser)
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="instruction data: a JSON list or JSON Lines (.jsonl) of "
                             "{instruction, input, output}")
    parser.add_argument("--limit", type=int, metavar="N", help="use only the first N entries")
    parser.add_argument("--style", choices=("alpaca", "chat", "template"),
                        help="prompt format; template: the --hf folder's chat template "
                             "(default alpaca)")
    parser.add_argument("--mask-prompt", action="store_true",
                        help="train on the response tokens only (prompt targets -100)")
    parser.add_argument("--bucket", action="store_true",
                        help="batch examples of similar length together (less padding)")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), default="default",
                        help="book: the book's chapter-7 settings in every hyperparameter "
                             "(weight decay on every parameter)")
    parser.add_argument("--epochs", type=float, default=EPOCHS,
                        help="passes over the training split (the book's number)")
    parser.add_argument("--steps", type=int, help="optimizer steps (instead of --epochs)")
    parser.add_argument("--eval-every", type=int, help="steps between evaluations (default 5)")
    parser.add_argument("--save-every", type=int, help="steps between checkpoints (default 100)")
    parser.add_argument("--max-new-tokens", type=int,
                        help="longest test response, in tokens (default 256)")
    parser.add_argument("--no-responses", action="store_true",
                        help="skip answering the test split after training")
    parser.add_argument("--judge-url", metavar="URL",
                        help="score the test responses 0-100 with a judge model: an Ollama server "
                             "(http://localhost:11434, /api/chat) or an OpenAI-compatible "
                             "endpoint (a URL with /v1)")
    parser.add_argument("--judge-model", default="llama3", help="the judge's model name")
    parser.add_argument("--judge-timeout", type=float, default=60.0,
                        help="seconds each judge request may take in all, answer included")
    add_run_arguments(parser, default_out=DEFAULT_OUT, task_config="InstructConfig")


def build(args):
    """Everything `run` needs, checked: (config, tc, ic, tokenizer, entries, params, source)."""
    from jaxllm.data.instructions import read_instructions, split_instructions
    from jaxllm.finetune.instruct_run import InstructConfig
    from jaxllm.train.optim import TrainConfig
    from jaxllm.train.runner import check_run_folder

    overrides = parse_overrides(args.overrides, "instruct", InstructConfig)
    check_run_folder(args.out, resume=args.resume, kind="instruct")  # before any work
    if args.judge_url is not None:
        from jaxllm.finetune.judge import check_judge

        try:
            check_judge(args.judge_url, args.judge_timeout)
        except ValueError as err:
            raise ValueError(f"--judge-url / --judge-timeout: {err}") from None
    if not os.path.exists(args.data):  # before any weights are read
        raise FileNotFoundError(f"--data {args.data}: no such file")
    params, config, tokenizer, source, kind = load_start(args, overrides["model"])
    if kind == "classify":
        raise ValueError(f"--run-dir {args.run_dir} is a classifier (its LM head was replaced by "
                         "a class head); start instruction fine-tuning from a language model")
    entries = read_instructions(args.data)
    if args.limit is not None:
        if args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        entries = entries[:args.limit]
    ic_fields = dict(overrides["instruct"])
    for flag, key in (("style", "style"), ("eval_every", "eval_every"),
                      ("save_every", "save_every"), ("max_new_tokens", "response_tokens")):
        if getattr(args, flag) is not None:
            ic_fields[key] = getattr(args, flag)
    if args.mask_prompt:
        ic_fields["mask_prompt"] = True
    if args.bucket:
        ic_fields["bucket"] = True
    if args.no_responses:
        ic_fields["responses"] = False
    ic = InstructConfig(**ic_fields)
    train_fields = {**PROTOCOLS[args.protocol], **overrides["train"]}
    train_fields["total_steps"] = total_steps(args, train_fields,
                                              len(split_instructions(entries)[0]), "entries")
    tc = TrainConfig.torch_adamw(**train_fields)
    return config, tc, ic, tokenizer, entries, params, source


def _lora(args, config, tc, params):
    """(params, trainable, record) for LoRA: the starting weights (the loop's
    own random draw for --init random) with adapters, the adapters as the
    trainable set and the record of the LoRA choices; (params, None, None)
    without LoRA."""
    import jax

    from jaxllm.cli.lora import lora_start
    from jaxllm.model import init_params

    key = jax.random.key(tc.seed)
    start = lora_start(
        lambda: init_params(config, key, scheme=tc.init) if params is None else params, config,
        args, jax.random.fold_in(key, 1), run_dir=args.out, resume=args.resume)
    return (params, None, None) if start.trainable is None else start


def run(args) -> int:
    from jaxllm.cli import warnings_as_lines

    with warnings_as_lines():  # a truncation warning is a line, when it happens
        return _run(args)


def _run(args) -> int:
    from jaxllm.cli.run_options import mesh_from_args, run_training

    def body() -> str:
        from jaxllm.config import count_params
        from jaxllm.finetune.instruct_run import finetune_instruct, format_summary

        mesh, rules = mesh_from_args(args)
        config, tc, ic, tokenizer, entries, params, source = build(args)
        print(f"{args.data}: {len(entries):,} entries; model {config.n_layers} layers x "
              f"{config.emb_dim} ({count_params(config):,} parameters) from {source}; "
              f"{tc.total_steps} steps of {tc.batch_size}; run folder {args.out}",
              file=sys.stderr)
        params, trainable, lora = _lora(args, config, tc, params)
        judge = None if args.judge_url is None else {
            "url": args.judge_url, "model": args.judge_model, "timeout": args.judge_timeout}
        return format_summary(finetune_instruct(
            args.out, config, tc, ic, tokenizer, entries, params=params,
            fallback=not args.no_fallback, resume=args.resume, progress=not args.quiet,
            trainable=trainable, lora=lora, mesh=mesh, partition_rules=rules,
            data_name=os.path.basename(args.data), source=source, judge=judge))

    return run_training("finetune instruct", body)


def main(argv: list[str] | None = None) -> int:
    """`python -m jaxllm.cli.finetune_instruct ...`: the command on its own."""
    from jaxllm.cli.finetune import task_parser

    parser = task_parser("instruct")
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
