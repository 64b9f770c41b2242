"""The `jaxllm` command line: `jaxllm pretrain ...`, `jaxllm generate ...`.

Each subcommand is a module of this package with `add_arguments(parser)` and
`run(args) -> int`; it is imported only when chosen, so `--help` stays fast.
Process-wide settings belong to the subcommand that wants them: `pretrain`
keeps freed host memory for reuse only when asked (`--reuse-host-memory`, or
`--cpu-recipe`), and `generate` and `chat` leave malloc as it is. SIGINT and
SIGTERM stop every command cleanly with one line (`jaxllm.interrupt`): exit
code 130 or 143, a training run saving a checkpoint first.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import warnings

from jaxllm import interrupt

SUBCOMMANDS = {
    "pretrain": "Train a model on text (a preset or config file, local data, checkpoints).",
    "generate": "Generate text from a checkpoint or Hugging Face GPT-2, Llama or Qwen3 weights.",
    "launch": "Run a command as several processes on this machine (jax.distributed trials).",
    "chat": "Talk to an instruction-tuned run: prompts in the terminal, tokens streamed back.",
    "lora": "Merge a LoRA run's adapters into its weights (Hugging Face format), or export them.",
    "finetune": "Fine-tune a model for a task: finetune classify | finetune instruct.",
    "classify": "Label texts with a classification run (probabilities too).",
    "serve": "Serve a run or Hugging Face weights over the OpenAI API (continuous batching).",
    "eval": "Evaluate a model: eval perplexity (sliding window over held-out text).",
    "parity": "Check jaxllm against PyTorch and transformers; write the report (results/parity).",
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter for every `jaxllm` parser, silent where a
    default would say nothing (None, off, empty) or the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is None or default is False or default == [] or default == ""
                or "default" in text.lower()):
            return text
        return super()._get_help_string(action)


def make_parser(prog: str, description: str | None = None) -> argparse.ArgumentParser:
    """A parser of the `jaxllm` family: its defaults shown in `--help`."""
    return argparse.ArgumentParser(prog=prog, description=description,
                                   formatter_class=HelpFormatter)


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser of `jaxllm NAME` (its module imported only now)."""
    module = importlib.import_module(f"jaxllm.cli.{name}")
    parser = make_parser(f"jaxllm {name}", SUBCOMMANDS[name])
    module.add_arguments(parser)
    return parser


def add_fallback_argument(parser: argparse.ArgumentParser, *, resuming: bool = False) -> None:
    """--no-fallback: a damaged newest checkpoint is an error rather than skipped
    for the newest intact one (on --resume for the training commands)."""
    parser.add_argument("--no-fallback", action="store_true",
                        help=("with --resume, stop at" if resuming else "refuse")
                        + " a damaged latest checkpoint instead of using the newest intact one")


def add_cpu_recipe_argument(parser: argparse.ArgumentParser) -> None:
    """--cpu-recipe for the commands that run a trained model (generate, chat, serve)."""
    parser.add_argument("--cpu-recipe", action="store_true",
                        help="run the dense layers (and GPT-2's LayerNorms) on this CPU's fastest "
                             "kernels: MKL's products on Intel CPUs (float32 models; "
                             "jaxllm.kernels.recipe)")


def add_tokenizer_arguments(parser: argparse.ArgumentParser, *, default: str) -> None:
    """--tokenizer and --tokenizer-dir, as every command takes them."""
    parser.add_argument("--tokenizer", choices=("byte", "gpt2", "hf"), default=None,
                        help=f"byte, gpt2 or hf (a folder's tokenizer.json); default: {default}")
    parser.add_argument("--tokenizer-dir", metavar="DIR", default=None,
                        help="folder with the tokenizer's files: gpt2.tiktoken, encoder.json + "
                             "vocab.bpe, vocab.json + merges.txt, or tokenizer.json (default: "
                             "the run's or model folder's, then $JAXLLM_GPT2_DIR, then a "
                             "shared/data folder above the checkout)")


def utf8_text(value: str) -> str:
    """An argparse `type` for text flags: an argument whose bytes are not UTF-8
    (Python holds them as surrogate escapes) is a usage error naming the byte,
    rather than a codec traceback where the text is first encoded."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raw = os.fsencode(value)
        start = len(os.fsencode(value[:err.start]))
        raise argparse.ArgumentTypeError(
            f"not valid UTF-8 text: byte {start} is {raw[start:start + 1]!r} (give the text in "
            "UTF-8, the encoding jaxllm reads)") from None
    return value


@contextlib.contextmanager
def warnings_as_lines():
    """Warnings printed as they come, one line each (`warning: ...`), without
    the source file and line a user has no use for."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = shown


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    from jaxllm import __version__

    parser = make_parser("jaxllm", "GPT-style LLMs in JAX, the path of the book Build a Large "
                                   "Language Model (From Scratch).")
    parser.add_argument("--version", action="version", version=f"jaxllm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] in ("--version", "-h", "--help"):
            parser.parse_args(argv[:1])  # prints and exits
        if argv:
            parser.error(f"unknown command {argv[0]!r}; choose from {', '.join(SUBCOMMANDS)}")
        parser.print_help()
        return 2
    name = argv[0]
    prog = " ".join(["jaxllm", name, *[a for a in argv[1:2] if name in ("finetune", "lora")
                                        and not a.startswith("-")]])
    if interrupt.is_command():  # installed at `import jaxllm`; this names the stop line
        interrupt.install(prog)
    try:
        return importlib.import_module(f"jaxllm.cli.{name}").run(
            command_parser(name).parse_args(argv[1:]))
    except interrupt.Stopped as stop:  # a training loop saved and stopped (jaxllm.interrupt)
        print(f"{prog}: {stop}", file=sys.stderr)
        return stop.exit_code
    except OSError as err:  # a file or folder the system refuses: a sentence, not a traceback
        where = f" {err.filename}" if err.filename else ""
        print(f"{prog}: error:{where}: {err.strerror or err}", file=sys.stderr)
        return 2
