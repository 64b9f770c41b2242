"""`jaxllm finetune TASK ...`: fine-tune a model for a task.

    jaxllm finetune classify --hf gpt2/ --data spam.tsv --protocol book
    jaxllm finetune instruct --hf gpt2-medium/ --data instruction-data.json

Each task is its own command module (`finetune_classify`, `finetune_instruct`)
with its own options; `jaxllm finetune TASK --help` lists them.
"""

from __future__ import annotations

import argparse
import importlib

TASKS = {
    "classify": ("jaxllm.cli.finetune_classify",
                 "a text classifier: the LM head replaced by a class head"),
    "instruct": ("jaxllm.cli.finetune_instruct",
                 "instruction following: supervised fine-tuning on instruction/response pairs"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=sorted(TASKS),
                        help="; ".join(f"{k}: {v[1]}" for k, v in TASKS.items()))
    parser.add_argument("task_args", nargs=argparse.REMAINDER,
                        help="the task's own options (jaxllm finetune TASK --help)")


def run(args) -> int:
    module_name, description = TASKS[args.task]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"jaxllm finetune {args.task}",
                                     description=f"Fine-tune {description}.")
    module.add_arguments(parser)
    return module.run(parser.parse_args(args.task_args))
