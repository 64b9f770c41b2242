"""Hugging Face weights in and out: `GPT2LMHeadModel`, `LlamaForCausalLM`, `Qwen3ForCausalLM`.

    params, config = jaxllm.load_hf("path/to/Qwen3-0.6B")   # a folder, or a hub name
    jaxllm.save_hf("out/", params, config)   # transformers.AutoModelForCausalLM loads it

GPT-2's names: `transformer.wte.weight` (vocab, emb), `transformer.wpe.weight`,
`transformer.h.N.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj}.{weight,bias}`
(Conv1D weights are (in, out), as here), `transformer.ln_f.*` and `lm_head.weight`
(vocab, emb). Buffers that are not parameters (`attn.bias`, `attn.masked_bias`)
are ignored. Llama's and Qwen3's: `model.embed_tokens.weight`,
`model.layers.N.{input_layernorm,self_attn.{q,k,v,o}_proj,self_attn.{q,k}_norm,
post_attention_layernorm,mlp.{gate,up,down}_proj}.weight`, `model.norm.weight`
and `lm_head.weight` (nn.Linear weights are (out, in): transposed here). The
key map and the expected shapes are read from `jaxllm.layout`.

A `config.json` is translated field by field (`config_from_hf`); an option
this library does not compute (another RoPE type, a sliding window, biases
the family lacks, another activation) is refused by name, never ignored.
Weights are read tensor by tensor (`safetensors.safe_open`, single file or
sharded with `model.safetensors.index.json`, or `pytorch_model.bin` memory
mapped), so loading never holds two copies of the model in host memory.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import layout
from jaxllm.config import GPTConfig
from jaxllm.tree import path_str

Params = dict[str, Any]

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


class _Tensors:
    """Named tensors read one at a time: from a mapping, or from weight files
    (`_open_weights`), each `get` returning a float32-or-narrower numpy array."""

    def __init__(self, names, get, shape):
        self.names, self._get, self._shape = list(names), get, shape  # in the file's order

    @classmethod
    def of(cls, source) -> "_Tensors":
        if isinstance(source, _Tensors):
            return source
        sd = load_state_dict(source)
        return cls(sd, sd.__getitem__, lambda k: tuple(sd[k].shape))

    def get(self, name: str) -> np.ndarray:
        return self._get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._shape(name))


def from_hf_state_dict(state_dict: Mapping[str, Any] | str | os.PathLike,
                       config: GPTConfig) -> Params:
    """Parameters from a Hugging Face state dict (numpy, torch or a safetensors
    path) of the config's family, in `config.param_dtype`.

    Every expected tensor must be present with the expected shape; anything
    else (but GPT-2's buffers) is an error naming the key. GPT-2 with
    `qkv_bias=False`: `c_attn.bias` may be absent or all zeros. With a tied
    head `lm_head.weight` may be absent or equal to the embedding; with an
    untied head it is required.
    """
    return _from_tensors(_Tensors.of(state_dict), config)


def _from_tensors(sd: _Tensors, config: GPTConfig) -> Params:
    order = [k for k in sd.names if not k.endswith(_BUFFER_SUFFIXES)]
    names = set(order)
    expected = layout.hf_shapes(config)
    absent = [p for p in layout.rows(config, every=True) if not p.present(config)]
    optional = {p.hf for p in absent}

    unexpected = sorted(names - set(expected))
    if unexpected:
        raise ValueError(f"unexpected key(s) in state dict for this config: {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    missing = sorted(set(expected) - names - optional)
    if missing:
        raise ValueError(f"missing key(s) in state dict: {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")
    for key in order:
        if sd.shape(key) != expected[key]:
            raise ValueError(f"{key}: state dict has shape {sd.shape(key)}, "
                             f"config expects {expected[key]}")

    hf_name = {p.path: p.hf for p in layout.rows(config, every=True)}
    for p in absent:  # what Hugging Face keeps in their place must be what we assume
        if p.hf not in names:
            continue
        field, value = p.only_if
        given = (f"the config has {field}={getattr(config, field)!r}; "
                 f"use {field}={value!r} for these weights")
        if p.hf_absent == "zeros" and np.any(sd.get(p.hf) != 0):
            raise ValueError(f"{p.hf} is non-zero but {given}")
        tied = hf_name.get(p.hf_absent)
        if tied is not None and not np.array_equal(sd.get(p.hf), sd.get(tied)):
            raise ValueError(f"{p.hf} differs from {tied} but {given}")

    dtype = jnp.dtype(config.param_dtype)
    pad = config.padded_vocab_size - config.vocab_size

    def ours(p: layout.Param):
        x = sd.get(p.hf)
        if x.dtype != dtype:  # float32 on the host only when the result is float32
            x = x.astype(np.float32) if dtype == np.float32 else x
        x = x.T if p.transposed else x
        if p.vocab_axis is not None and pad:
            x = np.pad(x, [(0, pad if axis == p.vocab_axis else 0) for axis in range(x.ndim)])
        return jnp.asarray(x, dtype)

    return layout.unflatten(config, {p.path: ours(p) for p in layout.rows(config)})


def to_hf_state_dict(params: Params, config: GPTConfig, *,
                     dtype: Any = np.float32) -> dict[str, np.ndarray]:
    """A Hugging Face state dict of the config's family (numpy, `dtype`) from
    jaxllm parameters.

    Hugging Face's GPT-2 always has `c_attn.bias`; with `qkv_bias=False` it is
    written as zeros. `lm_head.weight` is always written (equal to the
    embedding when tied, as Hugging Face's own state dict has it).
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
            x = np.asarray(leaves[p.path], dtype=dtype)
            if p.vocab_axis is not None:  # drop the padding rows
                x = np.take(x, np.arange(config.vocab_size), axis=p.vocab_axis)
            sd[p.hf] = x.T if p.transposed else x
        elif p.hf_absent == "zeros":
            sd[p.hf] = np.zeros(shapes[p.hf], dtype)
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


# -- config.json -------------------------------------------------------------------
ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama",
                 "Qwen3ForCausalLM": "qwen3"}
_MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama", "qwen3": "qwen3"}
# Keys that describe tokens, training or bookkeeping, not the function computed.
_BOOKKEEPING = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout",
    "pretraining_tp", "max_window_layers", "_name_or_path", "output_attentions",
    "output_hidden_states", "return_dict", "id2label", "label2id", "task_specific_params",
    "tokenizer_class", "problem_type", "chunk_size_feed_forward", "is_encoder_decoder",
    "tie_encoder_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "finetuning_task", "prefix", "sep_token_id", "decoder_start_token_id", "pruned_heads",
    "torchscript", "use_bfloat16", "is_decoder", "num_labels", "_attn_implementation",
    "quantization_config_unused", "jaxllm_tokenizer",  # where `jaxllm lora merge` found it
}


def _family_of(hf: Mapping[str, Any], where: str) -> str:
    """"gpt2", "llama" or "qwen3", from `architectures` (else `model_type`)."""
    arches = hf.get("architectures") or []
    known = [ARCHITECTURES[a] for a in arches if a in ARCHITECTURES]
    if known:
        return known[0]
    if arches:
        raise ValueError(f"{where}: architectures {arches} are not ones jaxllm loads; it loads "
                         f"{sorted(ARCHITECTURES)}")
    if hf.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[hf["model_type"]]
    raise ValueError(f"{where} names no architecture jaxllm loads (architectures or model_type "
                     f"of {sorted(ARCHITECTURES)})")


def _rope_fields(hf: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The RoPE fields from either form: transformers 5's `rope_parameters`, or
    the top-level `rope_theta` with `rope_scaling` of earlier checkpoints."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    for k, v in scaling.items():
        params.setdefault(k, v)
    kind = params.pop("rope_type", params.pop("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "default":
        leftover = sorted(params)
    elif kind == "llama3":
        names = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
                 "high_freq_factor": "rope_high_freq_factor",
                 "original_max_position_embeddings": "rope_original_context"}
        absent = sorted(set(names) - set(params))
        if absent:
            raise ValueError(f"{where}: llama3 RoPE scaling lacks {absent}")
        out["rope_scaling"] = "llama3"
        for theirs, ours in names.items():
            out[ours] = params.pop(theirs)
        out["rope_original_context"] = int(out["rope_original_context"])
        leftover = sorted(params)
    else:
        raise ValueError(f"{where}: rope_type {kind!r} is not supported (jaxllm computes "
                         "'default' and 'llama3' RoPE)")
    if leftover:
        raise ValueError(f"{where}: RoPE option(s) {leftover} are not supported")
    return out


def config_from_hf(hf: Mapping[str, Any], where: str = "config.json") -> GPTConfig:
    """The `GPTConfig` of a Hugging Face `config.json` (as a dict). An option
    jaxllm does not compute is a ValueError naming it."""
    fam = _family_of(hf, where)
    if fam == "gpt2":
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"{where}: activation_function {act!r} is not supported (GPT-2 "
                             "computes the tanh GELU, 'gelu_new')")
        for key, value in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False)):
            if hf.get(key, value) != value:
                raise ValueError(f"{where}: {key}={hf[key]!r} is not supported")
        need = ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions")
        missing = [k for k in need if k not in hf]
        if missing:
            raise ValueError(f"{where} lacks GPT-2 key(s) {missing}")
        return GPTConfig(vocab_size=hf["vocab_size"], context_length=hf["n_positions"],
                         emb_dim=hf["n_embd"], n_heads=hf["n_head"], n_layers=hf["n_layer"],
                         ffn_dim=hf.get("n_inner"), ln_eps=hf.get("layer_norm_epsilon", 1e-5),
                         tie_embeddings=hf.get("tie_word_embeddings", True), qkv_bias=True,
                         drop_rate=0.0)

    handled = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
               "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
               "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias",
               "sliding_window", "use_sliding_window", "layer_types"}
    unknown = sorted(k for k in set(hf) - handled - _BOOKKEEPING if hf[k] is not None)
    if unknown:
        raise ValueError(f"{where}: option(s) {unknown} are not ones jaxllm computes for "
                         f"{fam}; refusing to load a model that may differ")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported ({fam} "
                         "computes SwiGLU with 'silu')")
    for key in ("attention_bias", "mlp_bias"):
        if hf.get(key):
            raise ValueError(f"{where}: {key}=true is not supported ({fam} has no biases)")
    if hf.get("use_sliding_window") or any(t != "full_attention" for t in hf.get("layer_types") or []):
        raise ValueError(f"{where}: a sliding attention window is in use (use_sliding_window / "
                         "layer_types); jaxllm computes full causal attention only")
    if fam == "llama" and hf.get("sliding_window") is not None:
        raise ValueError(f"{where}: sliding_window={hf['sliding_window']!r} is not supported")
    need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads")
    missing = [k for k in need if k not in hf]
    if missing:
        raise ValueError(f"{where} lacks key(s) {missing}")
    heads = hf["num_attention_heads"]
    return GPTConfig(
        vocab_size=hf["vocab_size"], context_length=hf.get("max_position_embeddings", 2048),
        emb_dim=hf["hidden_size"], n_heads=heads, n_layers=hf["num_hidden_layers"],
        ffn_dim=hf["intermediate_size"], n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_size=hf.get("head_dim") or hf["hidden_size"] // heads,
        ln_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
        norm="rmsnorm", positions="rope", mlp="swiglu", qkv_bias=False, out_bias=False,
        mlp_bias=False, qk_norm=fam == "qwen3", drop_rate=0.0, **_rope_fields(hf, where))


def hf_config_dict(config: GPTConfig) -> dict[str, Any]:
    """A `config.json` for `config`: GPT2LMHeadModel, or LlamaForCausalLM (Qwen3ForCausalLM
    with `qk_norm`), in transformers 5's form."""
    if config.family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                **hf_config_kwargs(config)}
    qwen = config.qk_norm
    rope: dict[str, Any] = {"rope_theta": config.rope_theta, "rope_type": "default"}
    if config.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=config.rope_factor,
                    low_freq_factor=config.rope_low_freq_factor,
                    high_freq_factor=config.rope_high_freq_factor,
                    original_max_position_embeddings=config.rope_original_context)
    d = {"architectures": ["Qwen3ForCausalLM" if qwen else "LlamaForCausalLM"],
         "model_type": "qwen3" if qwen else "llama", "vocab_size": config.vocab_size,
         "hidden_size": config.emb_dim, "intermediate_size": config.hidden_dim,
         "num_hidden_layers": config.n_layers, "num_attention_heads": config.n_heads,
         "num_key_value_heads": config.kv_heads, "head_dim": config.head_dim,
         "max_position_embeddings": config.context_length, "rms_norm_eps": config.ln_eps,
         "rope_parameters": rope, "tie_word_embeddings": config.tie_embeddings,
         "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0,
         "dtype": config.param_dtype}
    if qwen:
        d.update(use_sliding_window=False, sliding_window=None)
    else:
        d["mlp_bias"] = False
    return d


# -- folders -------------------------------------------------------------------------
def resolve(path_or_name: str | os.PathLike) -> str:
    """A local folder holding a model: `path_or_name` itself, or a hub name
    ("Qwen/Qwen3-0.6B") downloaded through `huggingface_hub` to its cache."""
    path = os.fspath(path_or_name)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{path} is a file; give the model's folder (config.json and weights)")
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"{path}: no such folder (nor a hub name like 'Qwen/Qwen3-0.6B')")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(f"{path}: no such folder, and huggingface_hub is not installed "
                                "to download it") from None
    try:
        return snapshot_download(path, allow_patterns=["config.json", "*.safetensors",
                                                       "model.safetensors.index.json",
                                                       "tokenizer*", "generation_config.json"])
    except Exception as err:  # offline, unknown name, gated: the user needs the same advice
        raise FileNotFoundError(f"{path}: no such folder, and downloading it from the Hugging "
                                f"Face hub failed ({type(err).__name__}); offline, give a local "
                                "folder with config.json and the weights") from None


def open_weights(folder: str) -> _Tensors:
    """The weights of a folder, read tensor by tensor: `model.safetensors`, the
    shards listed in `model.safetensors.index.json`, or `pytorch_model.bin`
    (memory-mapped). GPT-2 files saved from `GPT2Model` get the `transformer.`
    prefix that `GPT2LMHeadModel` names carry."""
    index = os.path.join(folder, "model.safetensors.index.json")
    single = os.path.join(folder, "model.safetensors")
    if os.path.exists(index):
        import json

        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif os.path.exists(single):
        files, weight_map = ["model.safetensors"], None
    elif os.path.exists(os.path.join(folder, "pytorch_model.bin")):
        import torch

        sd = torch.load(os.path.join(folder, "pytorch_model.bin"), map_location="cpu",
                        weights_only=True, mmap=True)
        return _prefixed(_Tensors(sd, lambda k: _to_numpy(sd[k]), lambda k: sd[k].shape))
    else:
        raise FileNotFoundError(f"{folder} holds no model.safetensors, "
                                "model.safetensors.index.json or pytorch_model.bin")
    paths = [os.path.join(folder, name) for name in files]
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{folder}: the index lists {os.path.basename(path)}, "
                                    "which is not there")
    if weight_map is None:
        with _opened(paths[0]) as f:
            weight_map = {k: files[0] for k in f.keys()}

    def read(key, what):
        # Each read opens its file and closes it again: the file's mapped pages are
        # released with the tensor read, so the host holds the weights once (a
        # handle kept open would keep every page read so far resident beside them).
        with _opened(os.path.join(folder, weight_map[key])) as f:
            return f.get_tensor(key) if what == "tensor" else tuple(f.get_slice(key).get_shape())

    return _prefixed(_Tensors(weight_map, lambda k: read(k, "tensor"),
                              lambda k: read(k, "shape")))


def _opened(path: str):
    from safetensors import safe_open

    try:
        return safe_open(path, framework="numpy")
    except Exception as err:
        raise ValueError(f"{path}: not a readable safetensors file "
                         f"({type(err).__name__}: {str(err)[:120]})") from None


def _prefixed(t: _Tensors) -> _Tensors:
    if not any(k.startswith("wte.") for k in t.names):
        return t
    ours = {(k if k.startswith("lm_head.") else f"transformer.{k}"): k for k in t.names}
    return _Tensors(ours, lambda k: t.get(ours[k]), lambda k: t.shape(ours[k]))


def load_hf(path_or_name: str | os.PathLike, *, param_dtype: str | None = None,
            **changes: Any) -> tuple[Params, GPTConfig]:
    """(params, config) of a Hugging Face `GPT2LMHeadModel`, `LlamaForCausalLM` or
    `Qwen3ForCausalLM` folder (or hub name, downloaded when the network is there).

    The family comes from config.json's `architectures`; every key and shape
    is checked. `param_dtype` defaults to the checkpoint's (bfloat16 stays
    bfloat16, anything else is float32); `changes` are further `GPTConfig`
    fields (e.g. `compute_dtype`, `attn_impl`) that keep the architecture.
    """
    import json

    folder = resolve(path_or_name)
    config_file = os.path.join(folder, "config.json")
    try:
        with open(config_file, encoding="utf-8") as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{folder} has no config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from None
    config = config_from_hf(hf, config_file)
    if param_dtype is None:
        saved = hf.get("dtype") or hf.get("torch_dtype")
        param_dtype = "bfloat16" if saved == "bfloat16" else "float32"
    config = config.replace(param_dtype=param_dtype, **changes)
    if config.architecture() != config_from_hf(hf, config_file).architecture():
        raise ValueError(f"load_hf: {sorted(changes)} would change the architecture the weights "
                         "were trained for")
    try:
        return _from_tensors(open_weights(folder), config), config
    except ValueError as err:
        raise ValueError(f"{folder}: {err}") from None


def save_hf(path: str | os.PathLike, params: Params, config: GPTConfig) -> None:
    """Write `config.json` and `model.safetensors` (in the parameters' dtype) to
    the folder `path`, which `transformers.AutoModelForCausalLM.from_pretrained`
    loads. A tied head is written once, as Hugging Face writes it."""
    import json

    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    dtype = jnp.dtype(config.param_dtype)
    sd = to_hf_state_dict(params, config, dtype=dtype)
    if config.tie_embeddings:
        del sd["lm_head.weight"]  # safetensors refuses shared memory; transformers re-ties
    save_file(sd, os.path.join(os.fspath(path), "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(os.fspath(path), "config.json"), "w") as f:
        json.dump(hf_config_dict(config), f, indent=2)
