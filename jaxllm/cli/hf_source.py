"""`--hf` for every command: one loader for Hugging Face GPT-2 weights.

    jaxllm generate --hf path/to/gpt2 ...        # a folder: model.safetensors or
    jaxllm chat --hf gpt2 ...                    # pytorch_model.bin, config.json beside it;
    jaxllm finetune classify --hf gpt2-medium ...  # or a hub name, downloaded once

`generate`, `chat`, `finetune classify` and `finetune instruct` all call `load`,
so what one accepts every one accepts: a folder, a weights file in it, or a
Hugging Face hub name (downloaded to the hub's cache when `huggingface_hub` is
installed and the hub is reachable; otherwise the error says which of the two
is missing). The architecture is `config.json`'s; a `model.safetensors` without
it is read off the tensor shapes (`n_heads`, default emb_dim / 64).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Any, NamedTuple

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
ARCH_KEYS = {"n_embd": "emb_dim", "n_layer": "n_layers", "n_head": "n_heads",
             "vocab_size": "vocab_size", "n_positions": "context_length"}
HELP = ("Hugging Face GPT-2 weights: a folder with model.safetensors or pytorch_model.bin "
        "(and config.json), one of those files, or a hub name such as gpt2 (downloaded when "
        "huggingface_hub and the network are there)")


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
               f"model.safetensors or pytorch_model.bin and config.json")
    try:
        from jaxllm.tokenizer import TOKENIZER_FILES

        return snapshot_download(name, allow_patterns=["config.json", *WEIGHT_FILES,
                                                       *TOKENIZER_FILES])
    except LocalEntryNotFoundError:
        raise FileNotFoundError(offline) from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"--hf {name}: no such folder, and no such model on the "
                                f"Hugging Face hub (or it needs a login)") from None
    except Exception as err:  # refused, interrupted: the user needs the same advice
        raise FileNotFoundError(
            f"--hf {name}: no such folder, and downloading it from the Hugging Face hub failed "
            f"({type(err).__name__}); give a local folder with model.safetensors or "
            f"pytorch_model.bin and config.json") from None


def resolve(spec: str) -> str:
    """The local file or folder `--hf spec` names: the path itself, or a hub
    name's download."""
    if os.path.exists(spec):
        return spec
    if not HUB_NAME.match(spec):
        raise FileNotFoundError(f"--hf {spec}: no such file or directory")
    return _hub_download(spec)


def weights_file(path: str) -> str:
    """The weights file of a folder (model.safetensors first), or `path` itself."""
    if not os.path.isdir(path):
        return path
    for name in WEIGHT_FILES:
        if os.path.exists(os.path.join(path, name)):
            return os.path.join(path, name)
    raise FileNotFoundError(f"--hf {path}: the folder holds no model.safetensors or "
                            f"pytorch_model.bin")


def state_dict(path: str) -> dict:
    """The GPT-2 state dict of a Hugging Face folder or file, with the
    `transformer.` prefix GPT2LMHeadModel uses (GPT2Model files lack it)."""
    from jaxllm.hf import load_state_dict

    path = weights_file(path)
    try:
        if path.endswith(".bin"):
            import torch

            sd = load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        else:
            sd = load_state_dict(path)
    except (OSError, ValueError):
        raise
    except Exception as err:  # safetensors' and torch's own errors: a damaged file
        raise ValueError(f"--hf {path}: the weights file is damaged or of another format "
                         f"({type(err).__name__}: {str(err)[:120]})") from None
    if not any(k.startswith("transformer.") for k in sd):
        sd = {(k if k.startswith("lm_head.") else f"transformer.{k}"): v for k, v in sd.items()}
    return sd


def config_of(path: str, n_heads: int | None = None, sd: dict | None = None):
    """A `GPTConfig` for the weights at `path`: from the `config.json` beside
    them, else read off the tensor shapes of `sd` (a safetensors file names
    them; a pickled `.bin` needs its config.json)."""
    from jaxllm.config import GPTConfig

    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    config_file = os.path.join(directory, "config.json")
    if os.path.exists(config_file):
        with open(config_file) as f:
            hf = json.load(f)
        missing = sorted(set(ARCH_KEYS) - set(hf))
        if missing:
            raise ValueError(f"{config_file} lacks GPT-2 key(s) {missing}")
        kwargs = {ours: hf[theirs] for theirs, ours in ARCH_KEYS.items()}
        if n_heads is not None:
            kwargs["n_heads"] = n_heads
        kwargs["ffn_dim"] = hf.get("n_inner")
        kwargs["ln_eps"] = hf.get("layer_norm_epsilon", 1e-5)
        kwargs["tie_embeddings"] = hf.get("tie_word_embeddings", True)
        return GPTConfig(qkv_bias=True, drop_rate=0.0, **kwargs)
    if weights_file(path).endswith(".bin"):
        raise FileNotFoundError(f"--hf {path}: pytorch_model.bin needs its config.json")
    sd = state_dict(path) if sd is None else sd
    for key in ("transformer.wte.weight", "transformer.wpe.weight"):
        if key not in sd:
            raise ValueError(f"{path} has no {key}; is it GPT-2 in Hugging Face format?")
    vocab, emb = sd["transformer.wte.weight"].shape
    layers = {k.split(".")[2] for k in sd if k.startswith("transformer.h.")}
    head = sd.get("lm_head.weight")
    tied = head is None or bool((head == sd["transformer.wte.weight"]).all())
    return GPTConfig(qkv_bias=True, drop_rate=0.0, vocab_size=int(vocab), emb_dim=int(emb),
                     n_layers=len(layers),
                     context_length=int(sd["transformer.wpe.weight"].shape[0]),
                     n_heads=n_heads if n_heads is not None else max(1, int(emb) // 64),
                     ffn_dim=int(sd["transformer.h.0.mlp.c_fc.weight"].shape[1]),
                     tie_embeddings=tied)


def load(spec: str, *, n_heads: int | None = None,
         overrides: dict[str, Any] | None = None) -> HFModel:
    """The parameters and config of `--hf spec` (a folder, a weights file or a
    hub name), with `overrides` (GPTConfig fields) applied to the config."""
    from jaxllm.hf import from_hf_state_dict

    path = resolve(spec)
    sd = state_dict(path)  # first: a folder without weights is named as such
    config = config_of(path, n_heads, sd).replace(**(overrides or {}))
    return HFModel(from_hf_state_dict(sd, config), config, path)
