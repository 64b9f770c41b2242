"""GPT-2 weights in the Hugging Face `GPT2LMHeadModel` format.

Hugging Face names: `transformer.wte.weight` (vocab, emb), `transformer.wpe.weight`,
`transformer.h.N.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj}.{weight,bias}`
(Conv1D weights are (in, out), as here), `transformer.ln_f.*` and `lm_head.weight`
(vocab, emb). Buffers that are not parameters (`attn.bias`, `attn.masked_bias`)
are ignored. The key map and the expected shapes are read from `jaxllm.layout`.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import layout
from jaxllm.config import GPTConfig
from jaxllm.model import Params
from jaxllm.train.task import path_str

_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        value = value.numpy()
    return np.asarray(value)


def load_state_dict(source: Mapping[str, Any] | str | os.PathLike) -> dict[str, np.ndarray]:
    """A state dict as numpy arrays, from a mapping or a `.safetensors` file path
    (a directory holding `model.safetensors` works too)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "model.safetensors")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no safetensors weights at {path}")
        from safetensors.numpy import load_file

        return dict(load_file(path))
    return {k: _to_numpy(v) for k, v in source.items()}


def from_hf_state_dict(state_dict: Mapping[str, Any] | str | os.PathLike,
                       config: GPTConfig) -> Params:
    """Parameters from a Hugging Face GPT-2 state dict (numpy, torch or a safetensors path).

    Every expected tensor must be present with the expected shape; anything
    else (but buffers) is an error naming the key. With `qkv_bias=False` the
    `c_attn.bias` may be absent or all zeros. With a tied head `lm_head.weight`
    may be absent or equal to `wte`; with an untied head it is required.
    """
    sd = {k: v for k, v in load_state_dict(state_dict).items() if not k.endswith(_BUFFER_SUFFIXES)}
    expected = layout.hf_shapes(config)
    absent = [p for p in layout.rows(config, every=True) if not p.present(config)]
    optional = {p.hf for p in absent}

    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        raise ValueError(f"unexpected key(s) in state dict for this config: {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    missing = sorted(set(expected) - set(sd) - optional)
    if missing:
        raise ValueError(f"missing key(s) in state dict: {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")
    for key, arr in sd.items():
        if tuple(arr.shape) != expected[key]:
            raise ValueError(f"{key}: state dict has shape {tuple(arr.shape)}, "
                             f"config expects {expected[key]}")

    hf_name = {p.path: p.hf for p in layout.rows(config, every=True)}
    for p in absent:  # what Hugging Face keeps in their place must be what we assume
        if p.hf not in sd:
            continue
        field, value = p.only_if
        given = (f"the config has {field}={getattr(config, field)!r}; "
                 f"use {field}={value!r} for these weights")
        if p.hf_absent == "zeros" and np.any(sd[p.hf] != 0):
            raise ValueError(f"{p.hf} is non-zero but {given}")
        tied = hf_name.get(p.hf_absent)
        if tied is not None and not np.array_equal(sd[p.hf], sd[tied]):
            raise ValueError(f"{p.hf} differs from {tied} but {given}")

    dtype = jnp.dtype(config.param_dtype)
    pad = config.padded_vocab_size - config.vocab_size

    def ours(p: layout.Param):
        x = np.asarray(sd[p.hf], np.float32)
        x = x.T if p.transposed else x
        if p.vocab_axis is not None and pad:
            x = np.pad(x, [(0, pad if axis == p.vocab_axis else 0) for axis in range(x.ndim)])
        return jnp.asarray(x, dtype)

    return layout.unflatten(config, {p.path: ours(p) for p in layout.rows(config)})


def to_hf_state_dict(params: Params, config: GPTConfig) -> dict[str, np.ndarray]:
    """A Hugging Face GPT-2 state dict (numpy float32) from jaxllm parameters.

    Hugging Face's GPT-2 always has `c_attn.bias`; with `qkv_bias=False` it is
    written as zeros. `lm_head.weight` is always written (equal to `wte` when tied).
    """
    leaves = {path_str(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    shapes = layout.hf_shapes(config)
    hf_name = {p.path: p.hf for p in layout.rows(config, every=True)}
    sd: dict[str, np.ndarray] = {}
    for p in layout.rows(config, every=True):
        tied = None if p.present(config) else hf_name.get(p.hf_absent)
        if tied is not None:
            sd[p.hf] = sd[tied]  # the same array, as Hugging Face ties them
        elif p.path in leaves:
            x = np.asarray(leaves[p.path], dtype=np.float32)
            if p.vocab_axis is not None:  # drop the padding rows
                x = np.take(x, np.arange(config.vocab_size), axis=p.vocab_axis)
            sd[p.hf] = x.T if p.transposed else x
        elif p.hf_absent == "zeros":
            sd[p.hf] = np.zeros(shapes[p.hf], np.float32)
        else:
            raise KeyError(f"parameters have no {p.path!r}, which this config needs")
    return {k: np.ascontiguousarray(a) for k, a in sd.items()}


def save_safetensors(params: Params, config: GPTConfig, path: str | os.PathLike) -> None:
    """Write parameters as a Hugging Face GPT-2 `model.safetensors` file."""
    from safetensors.numpy import save_file

    sd = to_hf_state_dict(params, config)
    if config.tie_embeddings:  # safetensors refuses shared memory; HF re-ties on load
        sd["lm_head.weight"] = sd["lm_head.weight"].copy()
    save_file(sd, os.fspath(path), metadata={"format": "pt"})


def hf_config_kwargs(config: GPTConfig) -> dict[str, Any]:
    """Keyword arguments for `transformers.GPT2Config` describing the same model."""
    # GPT-2's end-of-text id (50256) as bos/eos only where the vocabulary has it.
    eot = 50256 if config.vocab_size > 50256 else None
    return dict(vocab_size=config.vocab_size, n_positions=config.context_length,
                n_embd=config.emb_dim, n_layer=config.n_layers, n_head=config.n_heads,
                n_inner=config.hidden_dim, activation_function="gelu_new",
                resid_pdrop=config.drop_rate, embd_pdrop=config.drop_rate,
                attn_pdrop=config.drop_rate, layer_norm_epsilon=config.ln_eps,
                tie_word_embeddings=config.tie_embeddings,
                bos_token_id=eot, eos_token_id=eot)
