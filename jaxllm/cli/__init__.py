"""The `jaxllm` command line: `jaxllm pretrain ...`, `jaxllm generate ...`.

Each subcommand is a module of this package with `add_arguments(parser)` and
`run(args) -> int`; it is imported only when chosen, so `--help` stays fast.
Process-wide settings belong to the subcommand that wants them: `pretrain`
keeps freed host memory for reuse only when asked (`--reuse-host-memory`, or
`--cpu-recipe`), and `generate` and `chat` leave malloc as it is.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "pretrain": "Train a model on text (a preset or config file, local data, checkpoints).",
    "generate": "Generate text from a checkpoint or Hugging Face GPT-2 weights.",
    "launch": "Run a command as several processes on this machine (jax.distributed trials).",
    "chat": "Talk to an instruction-tuned run: prompts in the terminal, tokens streamed back.",
    "lora": "Merge a LoRA run's adapters into its weights (Hugging Face format), or export them.",
    "finetune": "Fine-tune a model for a task: finetune classify | finetune instruct.",
    "classify": "Label texts with a classification run (probabilities too).",
}


def add_fallback_argument(parser: argparse.ArgumentParser, *, resuming: bool = False) -> None:
    """--no-fallback: a damaged newest checkpoint is an error rather than skipped
    for the newest intact one (on --resume for the training commands)."""
    parser.add_argument("--no-fallback", action="store_true",
                        help=("with --resume, stop at" if resuming else "refuse")
                        + " a damaged latest checkpoint instead of using the newest intact one")


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = argparse.ArgumentParser(prog="jaxllm", description="GPT-style LLMs in JAX.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(SUBCOMMANDS)}")
        parser.print_help()
        return 0 if argv else 2
    name = argv[0]
    module = importlib.import_module(f"jaxllm.cli.{name}")
    cmd = argparse.ArgumentParser(prog=f"jaxllm {name}", description=SUBCOMMANDS[name])
    module.add_arguments(cmd)
    return module.run(cmd.parse_args(argv[1:]))
