"""GPT-2 weights in the Hugging Face `GPT2LMHeadModel` format.

Hugging Face names: `transformer.wte.weight` (vocab, emb), `transformer.wpe.weight`,
`transformer.h.N.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj}.{weight,bias}`
(Conv1D weights are (in, out), as here), `transformer.ln_f.*` and `lm_head.weight`
(vocab, emb). Buffers that are not parameters (`attn.bias`, `attn.masked_bias`)
are ignored.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from jaxllm.config import GPTConfig
from jaxllm.model import Params

_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")

# (our path within a block, HF suffix within transformer.h.N, transpose?)
_BLOCK_KEYS = [
    (("norm1", "scale"), "ln_1.weight"),
    (("norm1", "bias"), "ln_1.bias"),
    (("attn", "qkv", "kernel"), "attn.c_attn.weight"),
    (("attn", "qkv", "bias"), "attn.c_attn.bias"),
    (("attn", "out", "kernel"), "attn.c_proj.weight"),
    (("attn", "out", "bias"), "attn.c_proj.bias"),
    (("norm2", "scale"), "ln_2.weight"),
    (("norm2", "bias"), "ln_2.bias"),
    (("ffn", "fc", "kernel"), "mlp.c_fc.weight"),
    (("ffn", "fc", "bias"), "mlp.c_fc.bias"),
    (("ffn", "proj", "kernel"), "mlp.c_proj.weight"),
    (("ffn", "proj", "bias"), "mlp.c_proj.bias"),
]


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


def _hf_layout(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Expected HF key -> shape for a config (all keys we read or write)."""
    c = config
    d, h, v = c.emb_dim, c.hidden_dim, c.vocab_size
    shapes = {"transformer.wte.weight": (v, d), "transformer.wpe.weight": (c.context_length, d)}
    per_block = {
        "ln_1.weight": (d,), "ln_1.bias": (d,),
        "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
        "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
        "ln_2.weight": (d,), "ln_2.bias": (d,),
        "mlp.c_fc.weight": (d, h), "mlp.c_fc.bias": (h,),
        "mlp.c_proj.weight": (h, d), "mlp.c_proj.bias": (d,),
    }
    for i in range(c.n_layers):
        for k, s in per_block.items():
            shapes[f"transformer.h.{i}.{k}"] = s
    shapes["transformer.ln_f.weight"] = (d,)
    shapes["transformer.ln_f.bias"] = (d,)
    shapes["lm_head.weight"] = (v, d)
    return shapes


def from_hf_state_dict(state_dict: Mapping[str, Any] | str | os.PathLike,
                       config: GPTConfig) -> Params:
    """Parameters from a Hugging Face GPT-2 state dict (numpy, torch or a safetensors path).

    Every expected tensor must be present with the expected shape; anything
    else (but buffers) is an error naming the key. With `qkv_bias=False` the
    `c_attn.bias` may be absent or all zeros. With a tied head `lm_head.weight`
    may be absent or equal to `wte`; with an untied head it is required.
    """
    sd = {k: v for k, v in load_state_dict(state_dict).items() if not k.endswith(_BUFFER_SUFFIXES)}
    expected = _hf_layout(config)
    optional = {"lm_head.weight"} if config.tie_embeddings else set()
    if not config.qkv_bias:
        optional |= {f"transformer.h.{i}.attn.c_attn.bias" for i in range(config.n_layers)}

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

    if not config.qkv_bias:
        for i in range(config.n_layers):
            b = sd.get(f"transformer.h.{i}.attn.c_attn.bias")
            if b is not None and np.any(b != 0):
                raise ValueError(f"transformer.h.{i}.attn.c_attn.bias is non-zero but the config "
                                 "has qkv_bias=False; use qkv_bias=True for these weights")
    if config.tie_embeddings and "lm_head.weight" in sd:
        if not np.array_equal(sd["lm_head.weight"], sd["transformer.wte.weight"]):
            raise ValueError("lm_head.weight differs from transformer.wte.weight but the config "
                             "has tie_embeddings=True; use tie_embeddings=False for these weights")

    dtype = jnp.dtype(config.param_dtype)
    pad = config.padded_vocab_size - config.vocab_size

    def arr(x):
        return jnp.asarray(np.asarray(x, np.float32), dtype)

    def pad_rows(x):
        return np.pad(x, ((0, pad), (0, 0))) if pad else x

    blocks = []
    for i in range(config.n_layers):
        blk: dict = {}
        for path, suffix in _BLOCK_KEYS:
            key = f"transformer.h.{i}.{suffix}"
            if path == ("attn", "qkv", "bias") and not config.qkv_bias:
                continue
            node = blk
            for name in path[:-1]:
                node = node.setdefault(name, {})
            node[path[-1]] = arr(sd[key])
        blocks.append(blk)
    params: Params = {
        "tok_emb": {"embedding": arr(pad_rows(sd["transformer.wte.weight"]))},
        "pos_emb": {"embedding": arr(sd["transformer.wpe.weight"])},
        "blocks": blocks,
        "final_norm": {"scale": arr(sd["transformer.ln_f.weight"]),
                       "bias": arr(sd["transformer.ln_f.bias"])},
    }
    if not config.tie_embeddings:
        params["out_head"] = {"kernel": arr(pad_rows(sd["lm_head.weight"]).T)}
    return params


def to_hf_state_dict(params: Params, config: GPTConfig) -> dict[str, np.ndarray]:
    """A Hugging Face GPT-2 state dict (numpy float32) from jaxllm parameters.

    Hugging Face's GPT-2 always has `c_attn.bias`; with `qkv_bias=False` it is
    written as zeros. `lm_head.weight` is always written (equal to `wte` when tied).
    """
    v = config.vocab_size

    def np32(x):
        return np.asarray(x, dtype=np.float32)

    sd = {
        "transformer.wte.weight": np32(params["tok_emb"]["embedding"])[:v],
        "transformer.wpe.weight": np32(params["pos_emb"]["embedding"]),
    }
    for i, blk in enumerate(params["blocks"]):
        for path, suffix in _BLOCK_KEYS:
            node = blk
            for name in path:
                node = node.get(name) if isinstance(node, dict) else None
                if node is None:
                    break
            if node is None:  # qkv bias absent
                node = np.zeros((3 * config.emb_dim,), np.float32)
            sd[f"transformer.h.{i}.{suffix}"] = np32(node)
    sd["transformer.ln_f.weight"] = np32(params["final_norm"]["scale"])
    sd["transformer.ln_f.bias"] = np32(params["final_norm"]["bias"])
    if config.tie_embeddings:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    else:
        sd["lm_head.weight"] = np32(params["out_head"]["kernel"]).T[:v]
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
