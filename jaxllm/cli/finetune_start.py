"""What the fine-tuning commands share: where the starting weights come from
(`--hf`, `--run-dir`, `--init random`), the tokenizer, the run-folder options
and how many steps the epochs make. Each command adds its own options and data.
"""

from __future__ import annotations

import argparse
from typing import Any, NamedTuple

from jaxllm.cli import add_tokenizer_arguments, hf_source


def add_start_arguments(parser: argparse.ArgumentParser) -> None:
    """--hf / --run-dir / --init (one required), --preset, --config, --tokenizer,
    --tokenizer-dir."""
    source = parser.add_mutually_exclusive_group(required=True)
    hf_source.add_hf_argument(source)
    source.add_argument("--run-dir", metavar="DIR", help="start from a jaxllm run's checkpoint")
    source.add_argument("--init", choices=("random",),
                        help="start from random weights (--preset / --config, --set)")
    parser.add_argument("--preset", default=None, help="model preset for --init random "
                                                       "(default: small)")
    parser.add_argument("--config", metavar="FILE.json", help="GPTConfig JSON for --init random")
    add_tokenizer_arguments(parser, default="the --hf folder's own (its tokenizer.json, or "
                                    "GPT-2's); the run's own for --run-dir; else gpt2 when the "
                                    "model's vocab_size is 50257, else byte")


def add_run_arguments(parser: argparse.ArgumentParser, *, default_out: str,
                      task_config: str) -> None:
    """The options every training command shares (`jaxllm.cli.run_options`), for a
    fine-tuning command whose own settings are `task_config`'s fields."""
    from jaxllm.cli.run_options import add_run_arguments as add

    add(parser, default_out=default_out, sections=f"GPTConfig, TrainConfig or {task_config}")


def parse_overrides(items: list[str], section: str, task_config: type
                    ) -> dict[str, dict[str, Any]]:
    """`--set` items (`["lr=1e-4", "pooling=mean"]`) as dicts for the "model",
    "train" and the task's `section`, values parsed by field type."""
    from jaxllm.cli.pretrain import parse_overrides as route
    from jaxllm.config import GPTConfig
    from jaxllm.train.optim import TrainConfig

    return route(items, {"model": GPTConfig, "train": TrainConfig, section: task_config})


class Start(NamedTuple):
    """The starting point of a fine-tuning run."""

    params: Any  # None for --init random: the loop draws them from its seed
    config: Any  # GPTConfig
    tokenizer: Any  # the Tokenizer
    source: str  # "hf:DIR", "run:DIR" or "random", as the run records it
    kind: str | None  # the --run-dir checkpoint's kind ("classify", ...), else None


def _merged_adapters(params, run_dir):
    """A LoRA run as a starting point: its adapters folded into the weights, so
    that the new run starts from what that run computed and trains (or adapts
    afresh) a plain model."""
    import sys

    from jaxllm import lora

    adapters = lora.adapters_of(params)[0]
    if not adapters:
        return params
    print(f"--run-dir {run_dir}: its {len(adapters)} LoRA adapters merged into the weights",
          file=sys.stderr)
    return lora.merge(params)


def _weights(args, model_overrides: dict[str, Any]):
    """(params or None, GPTConfig, default tokenizer name, source, kind, the
    places its tokenizer's files may be)."""
    from jaxllm.config import GPTConfig, get_preset

    if (args.preset or args.config) and not args.init:
        raise ValueError("--preset and --config are for --init random; --hf and --run-dir bring "
                         "their own architecture")
    if args.hf is not None:
        model = hf_source.load(args.hf, overrides=model_overrides)
        return (model.params, model.config, None, f"hf:{args.hf}", None,
                [(model.path, f"--hf {args.hf}")])
    if args.run_dir is not None:
        from jaxllm.tokenizer import recorded_places
        from jaxllm.train.checkpoint import load_params_and_meta

        params, meta = load_params_and_meta(args.run_dir)
        config = GPTConfig.from_dict(meta["model"]).replace(**model_overrides)
        params = _merged_adapters(params, args.run_dir)
        return (params, config, meta["tokenizer"], f"run:{args.run_dir}", meta.get("kind"),
                recorded_places(meta, args.run_dir))
    if args.config and args.preset:
        raise ValueError("give --preset or --config, not both")
    config = GPTConfig.from_json(args.config) if args.config else get_preset(args.preset or "small")
    return None, config.replace(**model_overrides), None, "random", None, []


def load_start(args, model_overrides: dict[str, Any]) -> Start:
    """The starting weights, their config (with the --set model fields) and the
    tokenizer, checked against each other. A random model takes the
    tokenizer's vocabulary size unless `vocab_size` was set."""
    from jaxllm.tokenizer import check_vocab, get_tokenizer

    params, config, default_tok, source, kind, places = _weights(args, model_overrides)
    if args.run_dir is not None:
        from jaxllm.cli.pretrain import check_run_tokenizer

        check_run_tokenizer(args.run_dir, default_tok, args.tokenizer, "fine-tune it")
    tokenizer = get_tokenizer(args.tokenizer or default_tok, args.tokenizer_dir, places=places,
                              vocab_size=config.vocab_size)
    if params is None and config.vocab_size != tokenizer.vocab_size:
        if "vocab_size" in model_overrides:
            raise ValueError(f"vocab_size={config.vocab_size} was set, but the {tokenizer.name} "
                             f"tokenizer has {tokenizer.vocab_size} ids")
        config = config.replace(vocab_size=tokenizer.vocab_size)
    if config.vocab_size < tokenizer.vocab_size:
        check_vocab(config.vocab_size, tokenizer)
    return Start(params, config, tokenizer, source, kind)


def total_steps(args, train_fields: dict[str, Any], n_train: int, unit: str) -> int:
    """Optimizer steps: --steps, a `total_steps` --set, or --epochs passes over
    the `n_train` training `unit`s in whole batches."""
    from jaxllm.train.optim import TrainConfig

    TrainConfig(**train_fields)  # every field checked (batch_size >= 1) before it divides
    batch = train_fields["batch_size"]
    if n_train // batch == 0:
        raise ValueError(f"the training split has {n_train} {unit}, fewer than one batch of "
                         f"{batch}")
    if args.steps is not None:
        return args.steps
    if "total_steps" in train_fields:
        return train_fields["total_steps"]
    if not args.epochs > 0:
        raise ValueError(f"--epochs must be > 0, got {args.epochs}")
    return max(1, round(args.epochs * (n_train // batch)))
