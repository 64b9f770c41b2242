"""`jaxllm finetune TASK ...`: fine-tune a model for a task.

    jaxllm finetune classify --hf gpt2/ --data spam.tsv --protocol book
    jaxllm finetune instruct --hf gpt2-medium/ --data instruction-data.json
    jaxllm finetune dpo --run-dir runs/instruct --data instruction-data-with-preference.json

Each task is its own command module (`finetune_classify`, `finetune_instruct`,
`finetune_dpo`)
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
    "dpo": ("jaxllm.cli.finetune_dpo",
            "preferences: direct preference optimisation (DPO) on chosen/rejected answer pairs"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("task", choices=sorted(TASKS),
                        help="; ".join(f"{k}: {v[1]}" for k, v in TASKS.items()))
    parser.add_argument("task_args", nargs=argparse.REMAINDER,
                        help="the task's own options (jaxllm finetune TASK --help)")


def task_parser(task: str) -> argparse.ArgumentParser:
    """The parser of `jaxllm finetune TASK`."""
    from jaxllm.cli import make_parser

    module_name, description = TASKS[task]
    parser = make_parser(f"jaxllm finetune {task}", f"Fine-tune {description}.")
    importlib.import_module(module_name).add_arguments(parser)
    return parser


def run(args) -> int:
    module = importlib.import_module(TASKS[args.task][0])
    return module.run(task_parser(args.task).parse_args(args.task_args))
