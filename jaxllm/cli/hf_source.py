"""`--hf` for every command: one loader for Hugging Face GPT-2, Llama 3 and Qwen3 weights.

    jaxllm generate --hf path/to/Qwen3-0.6B ...  # a folder: config.json, model.safetensors
    jaxllm chat --hf gpt2 ...                    # (or its shards, or pytorch_model.bin);
    jaxllm finetune classify --hf gpt2-medium ...  # or a hub name, downloaded once

`generate`, `chat`, `finetune classify`, `finetune instruct` and `finetune dpo`
all call `load`, so what one accepts every one accepts: a folder, a weights
file in it, or a Hugging Face hub name (downloaded to the hub's cache when
`huggingface_hub` is installed and the hub is reachable; otherwise the error
says which of the two is missing). The folder is read by `jaxllm.load_hf`: the
family and architecture are `config.json`'s, every key and shape is checked.
The folder's tokenizer (`tokenizer.json`, its chat template) is found by
`jaxllm.tokenizer.get_tokenizer` from `HFModel.path`.
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Any, NamedTuple

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
HELP = ("Hugging Face weights of GPT-2, Llama 3 or Qwen3: a folder with config.json and "
        "model.safetensors (or its shards, or pytorch_model.bin), one of those files, or a hub "
        "name such as gpt2 or Qwen/Qwen3-0.6B (downloaded when huggingface_hub and the network "
        "are there)")


def add_hf_argument(parser: argparse.ArgumentParser | Any) -> None:
    """The `--hf` option (on a parser or a mutually exclusive group), the same
    in every command."""
    parser.add_argument("--hf", metavar="DIR|NAME", default=None, help=HELP)


class HFModel(NamedTuple):
    """Weights read by `load`."""

    params: Any
    config: Any  # GPTConfig
    path: str  # the local file or folder read (a hub name's folder in the hub cache)


def _hub_download(name: str) -> str:
    """A Hugging Face model name downloaded to the local cache; its folder."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise FileNotFoundError(f"--hf {name}: no such folder, and huggingface_hub is not "
                                f"installed to download it as a hub model name "
                                f"(pip install huggingface_hub)") from None
    told = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    offline = (f"--hf {name}: no such folder; as a hub model name it is not in the local "
               f"Hugging Face cache and the hub cannot be reached"
               f"{' (HF_HUB_OFFLINE is set)' if told else ''}; give a local folder with "
               f"config.json and model.safetensors or pytorch_model.bin")
    try:
        from jaxllm.tokenizer import TOKENIZER_FILES

        return snapshot_download(name, allow_patterns=["config.json", *WEIGHT_FILES,
                                                       "model-*.safetensors", *TOKENIZER_FILES])
    except LocalEntryNotFoundError:
        raise FileNotFoundError(offline) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"--hf {name}: no such folder, and no such model on the "
                                f"Hugging Face hub (or it needs a login)") from None
    except Exception as err:  # refused, interrupted: the user needs the same advice
        raise FileNotFoundError(
            f"--hf {name}: no such folder, and downloading it from the Hugging Face hub failed "
            f"({type(err).__name__}); give a local folder with config.json and "
            f"model.safetensors or pytorch_model.bin") from None


def resolve(spec: str) -> str:
    """The local file or folder `--hf spec` names: the path itself, or a hub
    name's download."""
    if os.path.exists(spec):
        return spec
    if not HUB_NAME.match(spec):
        raise FileNotFoundError(f"--hf {spec}: no such file or directory")
    return _hub_download(spec)


def load(spec: str, *, overrides: dict[str, Any] | None = None) -> HFModel:
    """The parameters and config of `--hf spec` (a folder, a weights file in
    one, or a hub name) through `jaxllm.load_hf`, with `overrides` (GPTConfig
    fields) applied: those that keep the architecture as the weights are
    read, the others after, checked against the weights' shapes."""
    from jaxllm import layout
    from jaxllm.config import GPTConfig
    from jaxllm.hf import load_hf

    path = resolve(spec)
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if not any(os.path.exists(os.path.join(folder, name)) for name in WEIGHT_FILES):
        raise FileNotFoundError(f"--hf {spec}: the folder holds no "
                                f"{', '.join(WEIGHT_FILES[:-1])} or {WEIGHT_FILES[-1]}")
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"--hf {spec}: no config.json beside the weights (Hugging Face's "
                                f"save_pretrained writes one; it names the architecture)")
    overrides = dict(overrides or {})
    shaping = {k: overrides.pop(k) for k in list(overrides)  # fields the weights decide
               if k in GPTConfig().architecture()}
    try:
        params, config = load_hf(folder, **overrides)
    except ValueError as err:
        raise ValueError(f"--hf {spec}: {err}") from None
    if shaping:
        config = config.replace(**shaping)
        layout.check_params(params, config)
    return HFModel(params, config, folder)
