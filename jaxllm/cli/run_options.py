"""The options every training command shares (`pretrain`, `finetune classify`,
`finetune instruct`, `finetune dpo`): the run folder and its resume, `--set`,
progress, the device mesh and LoRA. Each command adds its own data and
schedule options beside them.
"""

from __future__ import annotations

import argparse

from jaxllm.cli import add_fallback_argument


def add_run_arguments(parser: argparse.ArgumentParser, *, default_out: str, sections: str,
                      resume_note: str = "") -> None:
    """--set (fields of the `sections`, in words), --out, --resume, --no-fallback,
    --quiet, --mesh, --partition-rules and the LoRA flags."""
    from jaxllm.cli.lora import add_lora_arguments

    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help=f"any {sections} field (repeatable)")
    parser.add_argument("--out", default=default_out, metavar="RUN_DIR",
                        help=f"run folder for checkpoints, metrics and plots (default "
                             f"{default_out})")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint in --out" + resume_note)
    add_fallback_argument(parser, resuming=True)
    parser.add_argument("--quiet", action="store_true",
                        help="no progress: neither the bar nor, into a log, its lines")
    parser.add_argument("--mesh", metavar="SPEC",
                        help="device mesh, e.g. 'data=2,fsdp=4' or 'fsdp=-1' (all devices): split "
                             "the batch over the devices and shard the state (jaxllm.sharding); "
                             "default: one device")
    parser.add_argument("--partition-rules", metavar="FILE",
                        help="JSON file of partition rules for --mesh (default: jaxllm.sharding."
                             "DEFAULT_RULES; `python -c \"from jaxllm import sharding; "
                             "print(sharding.rules_to_json())\"` prints them to start from)")
    add_lora_arguments(parser)


def mesh_from_args(args):
    """(mesh or None, partition rules or None) from --mesh, --partition-rules
    and, where the command has it, --distributed (which joins the multi-host
    run first)."""
    distributed = getattr(args, "distributed", False)
    if args.partition_rules and not (distributed or args.mesh):
        raise ValueError("--partition-rules needs --mesh"
                         + (" (or --distributed)" if hasattr(args, "distributed") else ""))
    if not (distributed or args.mesh):
        return None, None
    from jaxllm import sharding

    if distributed:
        sharding.initialize_distributed()
    mesh = sharding.make_mesh(args.mesh or "")
    rules = sharding.load_rules(args.partition_rules) if args.partition_rules else None
    return mesh, rules


def run_training(command: str, body) -> int:
    """`body()` (which trains and returns the summary's text) as the command
    `jaxllm <command>` ends: 0 and the summary; 1 and the reason for a run
    that diverged (its last good checkpoint kept); 2 and a sentence for bad
    input or a busy run folder."""
    import sys

    from jaxllm.train.lock import RunFolderBusy
    from jaxllm.train.loop import TrainingDiverged

    try:
        text = body()
    except TrainingDiverged as err:
        print(f"jaxllm {command}: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, RunFolderBusy) as err:
        print(f"jaxllm {command}: error: {err}", file=sys.stderr)
        return 2
    print(text)
    return 0
