"""`jaxllm pretrain`: train a model on text, with checkpoints, metrics and a loss plot.

    jaxllm pretrain                                   # the "small" preset on the built-in corpus
    jaxllm pretrain --preset small --data notes/ --steps 2000 --out runs/notes
    jaxllm pretrain --set emb_dim=256 --set lr=1e-3 --set drop_rate=0.1
    jaxllm pretrain --out runs/notes --resume         # continue where it stopped
    jaxllm pretrain --mesh data=2,fsdp=4              # data parallel + FSDP over 8 devices
    jaxllm pretrain --cpu-recipe                      # the fastest kernels for this CPU
    jaxllm pretrain --reuse-host-memory               # keep XLA's per-step scratch (CPU)
    jaxllm pretrain --lora-rank 16 --lora-targets attn  # train adapters only (jaxllm.lora)

`--set key=value` reaches any field of GPTConfig, TrainConfig or LoopConfig;
the value is parsed by the field's type (`none` for optional fields).

`--reuse-host-memory` sets glibc's malloc to keep the memory the process
frees (`jaxllm.host_memory`), so that on the CPU each step gets the previous
step's scratch space back instead of page-faulting it in afresh. It is a
process-wide change, made before JAX starts; `--cpu-recipe` turns it on too
(`--no-reuse-host-memory` keeps it off).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from jaxllm import host_memory
from jaxllm.cli.run_options import add_run_arguments, mesh_from_args, run_training
from jaxllm.config import PRESETS, GPTConfig, get_preset

DEFAULT_OUT = "runs/pretrain"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group()
    model.add_argument("--preset", default=None, choices=sorted(PRESETS),
                       help="model preset (default: small)")
    model.add_argument("--config", metavar="FILE.json",
                       help="JSON config: a GPTConfig dict, or sections 'model', 'train', 'loop' "
                            "(a run's config.json works)")
    parser.add_argument("--cpu-recipe", action="store_true",
                        help="train with the implementation settings that are fastest on this "
                             "CPU (jaxllm.kernels.recipe.cpu_recipe: the native kernels, and "
                             "micro-batches where they pay); --set still overrides each of them")
    parser.add_argument("--reuse-host-memory", action=argparse.BooleanOptionalAction,
                        default=None,
                        help="keep freed memory in the process (glibc malloc), so each CPU "
                             "training step reuses the last one's scratch space instead of "
                             "page-faulting it in again; default: on with --cpu-recipe, else off")
    parser.add_argument("--data", metavar="PATH",
                        help="text file, folder of *.txt files, or token file (.bin with its .json "
                             "header); default: the built-in corpus (Python's help topics)")
    parser.add_argument("--token-file", metavar="PATH.bin",
                        help="tokenise --data once into this binary file (reused when it exists) "
                             "and read it through a memory map")
    parser.add_argument("--errors", default="strict", choices=("strict", "replace"),
                        help="how to treat invalid UTF-8 in text files")
    parser.add_argument("--tokenizer", choices=("byte", "gpt2"),
                        help="default: gpt2 when the config's vocab_size is 50257, else byte")
    parser.add_argument("--tokenizer-dir", metavar="DIR",
                        help="folder with gpt2.tiktoken (or encoder.json + vocab.bpe)")
    from jaxllm.train.pretrain import LoopConfig
    from jaxllm.train.optim import TrainConfig

    given = "default: the --config's, else"  # these shortcuts override a config file's fields
    parser.add_argument("--steps", type=int, help=f"total optimizer steps "
                        f"(TrainConfig.total_steps; {given} {TrainConfig.total_steps})")
    parser.add_argument("--eval-every", type=int, help=f"steps between evaluations "
                        f"({given} {LoopConfig.eval_every})")
    parser.add_argument("--save-every", type=int, help=f"steps between checkpoints "
                        f"({given} {LoopConfig.save_every})")
    parser.add_argument("--keep", type=int, help=f"checkpoints kept ({given} {LoopConfig.keep})")
    parser.add_argument("--distributed", action="store_true",
                        help="join a multi-host run first (jax.distributed; coordinator from "
                             "JAXLLM_COORDINATOR, JAXLLM_NUM_PROCESSES, JAXLLM_PROCESS_ID)")
    add_run_arguments(parser, default_out=DEFAULT_OUT,
                      sections="GPTConfig, TrainConfig or LoopConfig",
                      resume_note=" (fresh start if none)")


# -- configuration -------------------------------------------------------------
def _config_classes():
    from jaxllm.train.pretrain import LoopConfig
    from jaxllm.train.optim import TrainConfig

    return {"model": GPTConfig, "train": TrainConfig, "loop": LoopConfig}


def _field_owner() -> dict[str, tuple[str, dataclasses.Field]]:
    owner = {}
    for section, cls in _config_classes().items():
        for f in dataclasses.fields(cls):
            owner[f.name] = (section, f)
    return owner


def parse_value(field: dataclasses.Field, text: str) -> Any:
    """`text` as a value of the field's declared type (int, float, bool, str, or X | None)."""
    kind = str(field.type).replace(" ", "")
    optional = "None" in kind.split("|")
    base = [t for t in kind.split("|") if t != "None"][0]
    if optional and text.lower() in ("none", "null"):
        return None
    try:
        if base == "bool":
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if base == "int":
            return int(text)
        if base == "float":
            return float(text)
    except ValueError:
        raise ValueError(f"--set {field.name}={text}: expected {kind}") from None
    return text


def parse_overrides(items: list[str], classes: dict[str, type] | None = None
                    ) -> dict[str, dict[str, Any]]:
    """`["lr=1e-3", "emb_dim=64"]` -> `{"train": {"lr": 0.001}, "model": {"emb_dim": 64}}`,
    each key routed to the config section (`classes`, default pretraining's) that owns it."""
    classes = classes or _config_classes()
    owner = {f.name: (section, f) for section, cls in classes.items()
             for f in dataclasses.fields(cls)}
    out: dict[str, dict[str, Any]] = {s: {} for s in classes}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        if key not in owner:
            raise ValueError(f"--set {key}: unknown setting; known settings: {sorted(owner)}")
        section, field = owner[key]
        out[section][key] = parse_value(field, value)
    return out


# Keys of a run's config.json besides the three config sections: a run folder's
# record may be passed back as --config, and these are ignored.
RUN_RECORD_KEYS = frozenset({"tokenizer", "tokenizer_dir", "data", "format", "data_name",
                             "tokens_per_step", "batches_per_epoch", "mesh", "partition_rules", "step",
                             "data_position", "tokens_seen", "schedule_changes"})


def check_field(field: dataclasses.Field, value: Any, where: str) -> None:
    """Raise ValueError unless `value` fits the field's declared type (int, float,
    bool, str, or X | None); `where` names the file and section."""
    kind = str(field.type).replace(" ", "")
    allowed = kind.split("|")
    if value is None:
        if "None" in allowed:
            return
        raise ValueError(f"{where}: {field.name} must be {kind}, got null")
    ok = {"int": lambda v: isinstance(v, int) and not isinstance(v, bool),
          "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str)}
    if not any(ok.get(t, lambda v: True)(value) for t in allowed if t != "None"):
        raise ValueError(f"{where}: {field.name} must be {kind}, got {type(value).__name__} "
                         f"{value!r}")


def _sectioned(data: dict[str, Any]) -> bool:
    """Whether a config file's object has sections ("model", "train", "loop")
    rather than the fields of one flat config."""
    return any(isinstance(v, dict) for v in data.values()) or "model" in data


def _read_config_file(path: str) -> dict[str, dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {p} does not exist")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"config file {p} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {p} must hold a JSON object")
    classes = _config_classes()
    if _sectioned(data):
        unknown = sorted(set(data) - set(classes) - RUN_RECORD_KEYS)
        if unknown:
            raise ValueError(f"config file {p}: unknown section(s) {unknown}; sections are "
                             f"{sorted(classes)}")
        sections = {}
        for name, cls in classes.items():
            section = data.get(name)
            section = {} if section is None else section
            if not isinstance(section, dict):
                raise ValueError(f"config file {p}: section {name!r} must be an object")
            fields = {f.name: f for f in dataclasses.fields(cls)}
            for key, value in section.items():
                if key not in fields:
                    raise ValueError(f"config file {p}, section {name!r}: unknown field {key!r}; "
                                     f"known fields: {sorted(fields)}")
                check_field(fields[key], value, f"config file {p}, section {name!r}")
            sections[name] = dict(section)
        return sections
    owner = _field_owner()  # flat: route each key to the config that owns it
    sections = {s: {} for s in classes}
    for key, value in data.items():
        if key not in owner:
            raise ValueError(f"config file {p}: unknown field {key!r}")
        check_field(owner[key][1], value, f"config file {p}")
        sections[owner[key][0]][key] = value
    return sections


def build_configs(args) -> tuple[GPTConfig, Any, Any, set[str]]:
    """(GPTConfig, TrainConfig, LoopConfig, the field names the user set explicitly)."""
    classes = _config_classes()
    base = {s: {} for s in classes}
    explicit: set[str] = set()
    if args.config:
        base = _read_config_file(args.config)
        explicit |= {k for section in base.values() for k in section}
        model = _build(GPTConfig, base["model"], {}, args.config, "model")
    else:
        model = get_preset(args.preset or "small")
    overrides = parse_overrides(args.overrides)
    if args.cpu_recipe:
        from jaxllm.kernels.recipe import cpu_recipe

        owner = _field_owner()
        for key, value in cpu_recipe().items():
            overrides[owner[key][0]].setdefault(key, value)
    for flag, section, key in (("steps", "train", "total_steps"), ("eval_every", "loop", "eval_every"),
                               ("save_every", "loop", "save_every"), ("keep", "loop", "keep")):
        if getattr(args, flag) is not None:
            overrides[section][key] = getattr(args, flag)
    explicit |= {k for section in overrides.values() for k in section}
    model = model.replace(**overrides["model"])
    train = _build(classes["train"], base["train"], overrides["train"], args.config, "train")
    loop = _build(classes["loop"], base["loop"], overrides["loop"], args.config, "loop")
    return model, train, loop, explicit


def _build(cls, values: dict[str, Any], overrides: dict[str, Any], path: str | None,
           section: str):
    """`cls(**values, **overrides)`: `values` from the `--config` file `path`,
    `overrides` from --set and the flags. A range error that the file's own
    values cause (they fail alike without the overrides) names the file, the
    section and the field, as the type errors do."""
    try:
        return cls(**{**values, **overrides})
    except ValueError as err:
        if path is None or _error_of(cls, values) != str(err):
            raise
        where = f"config file {path}"
        if _sectioned(json.loads(Path(path).read_text())):
            where += f", section {section!r}"
        raise ValueError(f"{where}: {str(err).removeprefix(cls.__name__ + '.')}") from None


def _error_of(cls, values: dict[str, Any]) -> str | None:
    """The message of the ValueError `cls(**values)` raises, None if it builds."""
    try:
        cls(**values)
    except ValueError as err:
        return str(err)
    return None


def match_vocab(model: GPTConfig, tokenizer, explicit: set[str]) -> GPTConfig:
    """Take vocab_size from the tokenizer, unless the user set a different one."""
    if model.vocab_size == tokenizer.vocab_size:
        return model
    if "vocab_size" in explicit:
        raise ValueError(f"vocab_size={model.vocab_size} was set explicitly, but the "
                         f"{tokenizer.name} tokenizer has {tokenizer.vocab_size} ids; drop the "
                         f"setting or choose the matching tokenizer")
    return model.replace(vocab_size=tokenizer.vocab_size)


# -- data ------------------------------------------------------------------------
def load_tokens(args, tokenizer):
    """(token array, description) for --data / --token-file."""
    from jaxllm.data import (DEFAULT_CORPUS_NAME, TokenFile, read_documents, tokenize_documents,
                             write_token_file)
    from jaxllm.data.token_file import sidecar_path

    data = Path(args.data) if args.data else None
    if data is not None and data.suffix == ".bin" and sidecar_path(data).exists():
        token_file = Path(args.data)
    elif args.token_file:
        token_file = Path(args.token_file)
        if not token_file.exists():
            if data is None:
                raise ValueError("--token-file needs --data (the text to tokenise)")
            sources = sorted(data.glob("*.txt")) if data.is_dir() else [data]
            if not sources:
                raise FileNotFoundError(f"folder {data} holds no *.txt files")
            print(f"tokenising {data} into {token_file} ...", file=sys.stderr)
            write_token_file(token_file, sources, tokenizer, errors=args.errors)
    else:
        docs = read_documents(data, errors=args.errors)
        name = str(data) if data is not None else DEFAULT_CORPUS_NAME
        return tokenize_documents(docs, tokenizer), name
    tf = TokenFile(token_file)
    if tf.tokenizer != tokenizer.name:
        raise ValueError(f"token file {token_file} was written with the {tf.tokenizer} tokenizer, "
                         f"not {tokenizer.name}")
    return tf.tokens, str(token_file)


def wants_host_memory_reuse(args) -> bool:
    """Whether this run keeps freed host memory: `--reuse-host-memory`, or the CPU recipe
    unless `--no-reuse-host-memory`."""
    if args.reuse_host_memory is not None:
        return args.reuse_host_memory
    return bool(args.cpu_recipe)


def run(args) -> int:
    if wants_host_memory_reuse(args):
        # first, before anything starts JAX's backend (host_memory says why)
        host_memory.reuse_host_memory()
    from jaxllm.tokenizer import get_tokenizer, recorded_places
    from jaxllm.train.pretrain import format_summary, train
    from jaxllm.train.runner import check_run_folder

    def body() -> str:
        check_run_folder(args.out, resume=args.resume)  # before any work
        mesh, rules = mesh_from_args(args)
        model, tc, lc, explicit = build_configs(args)
        name = args.tokenizer or ("gpt2" if model.vocab_size == 50257 else "byte")
        record = _run_record(args.out) if args.resume else {}
        recorded = record.get("tokenizer")
        check_run_tokenizer(args.out, recorded, args.tokenizer, "resume")
        name = recorded or name
        tokenizer = get_tokenizer(name, args.tokenizer_dir,
                                  places=recorded_places(record, args.out))
        model = match_vocab(model, tokenizer, explicit)
        tokens, data_name = load_tokens(args, tokenizer)
        print(f"{data_name}: {len(tokens):,} {tokenizer.name} tokens; model "
              f"{model.n_layers} layers x {model.emb_dim} ({_count(model):,} parameters); "
              f"run folder {args.out}", file=sys.stderr)
        params, trainable, lora_record = _lora_start(args, model, tc)
        return format_summary(train(
            args.out, model, tc, lc, tokenizer, tokens, data_name=data_name,
            resume=args.resume, fallback=not args.no_fallback, progress=not args.quiet,
            mesh=mesh, partition_rules=rules, params=params, trainable=trainable,
            lora_record=lora_record))

    return run_training("pretrain", body)


def _lora_start(args, model: GPTConfig, tc):
    """(params, trainable, record) for LoRA: the run's own initial weights, frozen,
    with fresh adapters for --lora-rank, or on --resume the adapters the run was
    saved with (`jaxllm.cli.lora.lora_start`: LoRA flags that disagree with them
    are refused); (None, None, None) without LoRA (the loop initialises)."""
    import jax

    from jaxllm.cli.lora import lora_start
    from jaxllm.model import init_params

    key = jax.random.key(tc.seed)
    return lora_start(lambda: init_params(model, key, scheme=tc.init), model, args,
                      jax.random.fold_in(key, 1), run_dir=args.out, resume=args.resume)


def check_run_tokenizer(run_dir, recorded: str | None, asked: str | None, verb: str) -> None:
    """Refuse `--tokenizer asked` for a run trained with another tokenizer: its
    ids would stand for other text to the model (`verb`: what the command does
    with the run, for the message). `jaxllm generate --run-dir` shares it."""
    if recorded and asked and asked != recorded:
        raise ValueError(f"{run_dir} was trained with the {recorded} tokenizer, not "
                         f"--tokenizer {asked}; drop the flag to {verb} with the run's own")


def _run_record(run_dir) -> dict:
    """A run folder's config.json ({} without one): its tokenizer and the
    folder of its files."""
    try:
        record = json.loads((Path(run_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _count(model: GPTConfig) -> int:
    from jaxllm.config import count_params

    return count_params(model)
