"""The GPT configuration: a frozen, hashable dataclass and the GPT-2 presets.

A `GPTConfig` holds two kinds of field. The architecture fields (the seed's
seven keys plus `ffn_dim`, `tie_embeddings`, `ln_eps` and the family fields
below) decide the parameter shapes and the function the model computes. The implementation
fields (`attn_impl`, `matmul_impl`, `norm_impl`, `loss_impl`, dtypes,
`scan_layers`, `remat`, `vocab_multiple`; see `jaxllm.ops`) only
change how XLA computes the same function, and every one of them is tested
for equality with the reference path. Because the config is hashable it can
be passed to `jax.jit` as a static argument.

Families. The defaults are GPT-2's; Llama 3 and Qwen3 set the fields in which
they differ (`norm`, `positions` and the RoPE fields, `mlp`, `n_kv_heads`,
`head_size`, `qk_norm`, the bias flags). The norm, positions and MLP together
name the family (`GPTConfig.family`), whose module in `jaxllm.models` builds
and runs the parameters: ("layernorm", "learned", "gelu") is "gpt2",
("rmsnorm", "rope", "swiglu") is "llama" (Llama 3 and Qwen3, which adds
`qk_norm`). Other combinations are refused rather than half supported.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

ATTN_IMPLS = ("reference", "blockwise", "xla", "cudnn", "mkl")
DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
MATMUL_IMPLS = ("xla", "mkl")
NORM_IMPLS = ("xla", "rowwise")
LOSS_IMPLS = ("xla", "rowwise")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "swiglu")
ROPE_SCALINGS = ("none", "llama3")
# (norm, positions, mlp) -> the family module in jaxllm.models that runs it.
FAMILIES = {("layernorm", "learned", "gelu"): "gpt2", ("rmsnorm", "rope", "swiglu"): "llama"}
# Earlier names of the row-wise kernels, still accepted (saved configs use them).
_IMPL_ALIASES = {("norm_impl", "mkl"): "rowwise", ("loss_impl", "mkl"): "rowwise"}
# Fields with a value that runs a native CPU kernel of jaxllm.kernels (float32,
# one device): (field, that value, the XLA-side value to use where it cannot run).
NATIVE_KERNEL_FIELDS = (("matmul_impl", "mkl", "xla"), ("attn_impl", "mkl", "blockwise"),
                        ("norm_impl", "rowwise", "xla"), ("loss_impl", "rowwise", "xla"))


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters of a GPT-2 style model.

    The first seven fields are the keys of the classic configuration dict
    (`GPTConfig.from_dict` accepts it as is); the rest have GPT-2 defaults.
    """

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    # Beyond the classic dict.
    ffn_dim: int | None = None  # feed-forward hidden size; None means 4 * emb_dim
    tie_embeddings: bool = False  # output head shares the token embedding
    ln_eps: float = 1e-5  # the norm's epsilon (LayerNorm or RMSNorm)
    # Where the families differ (GPT-2's values by default; see the module docstring).
    norm: str = "layernorm"  # or "rmsnorm" (no bias, no centring)
    positions: str = "learned"  # learned position table, or "rope" (rotary, rotate-half form)
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # or "llama3": Llama 3's frequency scaling, the four fields below
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    mlp: str = "gelu"  # or "swiglu": down(silu(gate(x)) * up(x))
    n_kv_heads: int | None = None  # grouped-query attention; None means n_heads
    head_size: int | None = None  # per-head width; None means emb_dim // n_heads (`head_dim`)
    qk_norm: bool = False  # Qwen3's per-head RMSNorm on queries and keys
    out_bias: bool = True  # bias on the attention output projection
    mlp_bias: bool = True  # biases on the MLP's layers
    # Implementation choices: same function, different speed.
    attn_impl: str = "blockwise"  # "mkl" fastest on x86 CPUs, "cudnn" on NVIDIA GPUs (attention.py)
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    scan_layers: bool = False
    remat: str = "none"
    vocab_multiple: int = 1  # pad the embedding rows to a multiple of this
    matmul_impl: str = "xla"  # dense layers: XLA's dot, or "mkl" (Intel CPUs, float32; jaxllm.kernels.mkl)
    norm_impl: str = "xla"  # LayerNorm: XLA ops, or "rowwise" (one CPU kernel pass, float32)
    loss_impl: str = "xla"  # cross-entropy: XLA ops, or "rowwise" (one CPU kernel pass, float32)

    def __post_init__(self) -> None:
        for (name, old), new in _IMPL_ALIASES.items():
            if getattr(self, name) == old:
                object.__setattr__(self, name, new)
        _validate(self)

    # -- derived sizes -----------------------------------------------------
    @property
    def hidden_dim(self) -> int:
        """Size of the feed-forward hidden layer."""
        return self.ffn_dim if self.ffn_dim is not None else 4 * self.emb_dim

    @property
    def head_dim(self) -> int:
        """Width of one attention head: `head_size`, or emb_dim // n_heads."""
        return self.head_size if self.head_size is not None else self.emb_dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads: `n_kv_heads`, or n_heads (plain multi-head attention)."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def family(self) -> str:
        """The family module (`jaxllm.models`) that the norm, positions and MLP name."""
        return FAMILIES[(self.norm, self.positions, self.mlp)]

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding: `vocab_size` rounded up to `vocab_multiple`."""
        m = self.vocab_multiple
        return -(-self.vocab_size // m) * m

    # -- conversions ---------------------------------------------------------
    def replace(self, **changes: Any) -> "GPTConfig":
        """A copy with some fields changed (validated like any new config)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ValueError(f"GPTConfig has no field(s) {sorted(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GPTConfig":
        """Build a config from a dict such as the classic `GPT_CONFIG_124M` dict.

        Missing keys take their defaults; an unknown key is an error.
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"GPTConfig.from_dict expects a mapping, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names, key=repr)  # keys may not all be strings
        if unknown:
            raise ValueError(f"unknown GPTConfig field(s) {unknown}; known fields: {sorted(names)}")
        return cls(**dict(d))

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "GPTConfig":
        """Read a config written by `to_json` (the fine-tuning commands' --config);
        every error names the file, since the caller may be reading several."""
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} does not exist") from None
        except IsADirectoryError:
            raise ValueError(f"config file {path} is a folder, not a JSON file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"config file {path} is not valid JSON: {err}") from None
        # a pretrain config (or a run's config.json) nests the model fields in a section
        sections = [k for k in ("model", "train", "loop")
                    if isinstance(data, dict) and isinstance(data.get(k), dict)]
        if sections:
            raise ValueError(f"config file {path} is a sectioned `jaxllm pretrain` config "
                             f"(sections {', '.join(sections)}); this --config takes the "
                             f"GPTConfig fields alone: give the content of its \"model\" "
                             f"section as the whole file")
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise ValueError(f"config file {path}: {err}") from None

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    def architecture(self) -> dict[str, Any]:
        """The fields that decide parameter shapes and values (not how they are computed)."""
        keep = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers",
                "qkv_bias", "ffn_dim", "tie_embeddings", "norm", "positions", "mlp",
                "n_kv_heads", "head_size", "qk_norm", "out_bias", "mlp_bias", "rope_theta",
                "rope_scaling", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                "rope_original_context")
        d = {k: getattr(self, k) for k in keep}
        d["ffn_dim"] = self.hidden_dim
        d["n_kv_heads"] = self.kv_heads
        d["head_size"] = self.head_dim
        if self.positions != "rope":  # unused: two GPT-2 configs differing there are one model
            for k in keep:
                if k.startswith("rope_"):
                    del d[k]
        elif self.rope_scaling == "none":
            for k in ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                      "rope_original_context"):
                del d[k]
        return d


def _validate(c: GPTConfig) -> None:
    def expect(name: str, types: tuple[type, ...], what: str) -> Any:
        value = getattr(c, name)
        # bool is an int subclass; a size given as True is a mistake.
        if isinstance(value, bool) and bool not in types:
            raise ValueError(f"GPTConfig.{name} must be {what}, got bool {value!r}")
        if not isinstance(value, types):
            raise ValueError(f"GPTConfig.{name} must be {what}, got {type(value).__name__} {value!r}")
        return value

    for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "vocab_multiple"):
        if expect(name, (int,), "a positive int") <= 0:
            raise ValueError(f"GPTConfig.{name} must be a positive int, got {getattr(c, name)!r}")
    if c.ffn_dim is not None and expect("ffn_dim", (int,), "a positive int or None") <= 0:
        raise ValueError(f"GPTConfig.ffn_dim must be a positive int or None, got {c.ffn_dim!r}")
    for name in ("n_kv_heads", "head_size"):
        if getattr(c, name) is not None and expect(name, (int,), "a positive int or None") <= 0:
            raise ValueError(f"GPTConfig.{name} must be a positive int or None, "
                             f"got {getattr(c, name)!r}")
    if c.head_size is None and c.emb_dim % c.n_heads:
        raise ValueError(
            f"GPTConfig.emb_dim ({c.emb_dim}) must be divisible by n_heads ({c.n_heads}), "
            "or head_size given")
    if c.n_heads % c.kv_heads:
        raise ValueError(f"GPTConfig.n_heads ({c.n_heads}) must be divisible by n_kv_heads "
                         f"({c.kv_heads}): each key/value head serves a whole group of heads")
    rate = expect("drop_rate", (int, float), "a number in [0, 1)")
    if not (0.0 <= rate < 1.0) or math.isnan(rate):
        raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {rate!r}")
    for name in ("qkv_bias", "tie_embeddings", "scan_layers", "qk_norm", "out_bias", "mlp_bias"):
        expect(name, (bool,), "a bool")
    eps = expect("ln_eps", (int, float), "a positive number")
    if not eps > 0:
        raise ValueError(f"GPTConfig.ln_eps must be positive, got {eps!r}")
    for name, allowed in (("attn_impl", ATTN_IMPLS), ("param_dtype", DTYPES),
                          ("compute_dtype", DTYPES), ("remat", REMAT_POLICIES),
                          ("matmul_impl", MATMUL_IMPLS), ("norm_impl", NORM_IMPLS),
                          ("loss_impl", LOSS_IMPLS), ("norm", NORMS), ("positions", POSITIONS),
                          ("mlp", MLPS), ("rope_scaling", ROPE_SCALINGS)):
        value = expect(name, (str,), f"one of {allowed}")
        if value not in allowed:
            raise ValueError(f"GPTConfig.{name} must be one of {allowed}, got {value!r}")
    _validate_family(c)
    for name, native, alternative in NATIVE_KERNEL_FIELDS:
        if getattr(c, name) == native and c.compute_dtype != "float32":
            raise ValueError(f"GPTConfig.{name}={native!r} computes in float32, but compute_dtype is "
                             f"{c.compute_dtype!r}; use {name}={alternative!r} for low-precision "
                             "compute")


def _validate_family(c: GPTConfig) -> None:
    """The family fields: a known family, and the settings it (and each kernel) can run."""
    combo = (c.norm, c.positions, c.mlp)
    if combo not in FAMILIES:
        known = "; ".join(f"norm={n!r}, positions={p!r}, mlp={m!r} ({f})"
                          for (n, p, m), f in FAMILIES.items())
        raise ValueError(f"GPTConfig norm={c.norm!r}, positions={c.positions!r}, mlp={c.mlp!r} "
                         f"is not a model family jaxllm implements; the families: {known}")
    for name in ("rope_theta", "rope_factor", "rope_low_freq_factor", "rope_high_freq_factor"):
        value = expect_number(c, name)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"GPTConfig.{name} must be a positive number, got {value!r}")
    if isinstance(c.rope_original_context, bool) or not isinstance(c.rope_original_context, int) \
            or c.rope_original_context <= 0:
        raise ValueError(f"GPTConfig.rope_original_context must be a positive int, "
                         f"got {c.rope_original_context!r}")
    if c.rope_scaling == "llama3" and not c.rope_low_freq_factor < c.rope_high_freq_factor:
        raise ValueError(f"GPTConfig.rope_low_freq_factor ({c.rope_low_freq_factor}) must be "
                         f"below rope_high_freq_factor ({c.rope_high_freq_factor})")
    if c.positions == "rope" and c.head_dim % 2:
        raise ValueError(f"GPTConfig.head_dim {c.head_dim} is odd, but RoPE rotates pairs of "
                         "dimensions: give an even head_size (or emb_dim / n_heads)")
    if c.family == "gpt2":
        for name, value in (("n_kv_heads", c.kv_heads != c.n_heads),
                            ("head_size", c.head_dim * c.n_heads != c.emb_dim),
                            ("qk_norm", c.qk_norm), ("out_bias", not c.out_bias),
                            ("mlp_bias", not c.mlp_bias)):
            if value:
                raise ValueError(f"GPTConfig.{name}={getattr(c, name)!r} is not available in the "
                                 "GPT-2 family (packed qkv, biases everywhere); it is a Llama "
                                 "family setting (norm='rmsnorm', positions='rope', mlp='swiglu')")
    else:
        for name in ("qkv_bias", "out_bias", "mlp_bias"):
            if getattr(c, name):
                raise ValueError(f"GPTConfig.{name}=True is not available in the Llama family "
                                 "(its projections have no biases)")
    # The native CPU kernels compute GPT-2's operations only.
    if c.attn_impl == "mkl" and (c.kv_heads != c.n_heads or c.positions == "rope"):
        raise ValueError("GPTConfig.attn_impl='mkl' computes multi-head attention on the packed "
                         "qkv projection, without grouped-query attention or RoPE; use "
                         "attn_impl='blockwise' (or 'xla') for this model")
    if c.norm_impl == "rowwise" and c.norm == "rmsnorm":
        raise ValueError("GPTConfig.norm_impl='rowwise' runs LayerNorm only, not RMSNorm; use "
                         "norm_impl='xla' for this model")


def expect_number(c: GPTConfig, name: str) -> float:
    value = getattr(c, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"GPTConfig.{name} must be a number, got {type(value).__name__} "
                         f"{value!r}")
    return value


def count_params(config: GPTConfig) -> int:
    """Number of parameters, computed from the shapes alone (nothing is allocated)."""
    return sum(math.prod(s) for s in param_shapes(config).values())


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter, keyed by its path in the parameter tree (in tree
    order), read from `init_params` without allocating (`jaxllm.layout`)."""
    from jaxllm.layout import param_shapes  # the layout needs the model, which needs this module

    return param_shapes(config)


def param_bytes(config: GPTConfig) -> int:
    """Memory taken by the parameters in `config.param_dtype`."""
    itemsize = {"float32": 4, "bfloat16": 2, "float16": 2}[config.param_dtype]
    return count_params(config) * itemsize


def _llama(**kw) -> GPTConfig:
    """A Llama-family preset: RMSNorm, RoPE, SwiGLU, no biases, no dropout."""
    return GPTConfig(norm="rmsnorm", positions="rope", mlp="swiglu", qkv_bias=False,
                     out_bias=False, mlp_bias=False, drop_rate=0.0, **kw)


def _llama3(**kw) -> GPTConfig:
    """A Llama 3.x preset (vocabulary, theta and frequency scaling as published)."""
    return _llama(vocab_size=128256, context_length=131072, rope_theta=500000.0,
                  rope_scaling="llama3", rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                  rope_original_context=8192, ln_eps=1e-5, n_kv_heads=8, **kw)


def _qwen3(**kw) -> GPTConfig:
    """A Qwen3 preset: q/k norm, head width 128 whatever emb_dim, 8 key/value heads."""
    return _llama(vocab_size=151936, context_length=40960, rope_theta=1000000.0, ln_eps=1e-6,
                  qk_norm=True, head_size=128, n_kv_heads=8, **kw)


# The classic 124M configuration: qkv_bias False, untied output head.
GPT_CONFIG_124M = GPTConfig()

PRESETS: dict[str, GPTConfig] = {
    "gpt2-124m": GPT_CONFIG_124M,
    "gpt2-355m": GPTConfig(emb_dim=1024, n_layers=24, n_heads=16),
    "gpt2-774m": GPTConfig(emb_dim=1280, n_layers=36, n_heads=20),
    "gpt2-1558m": GPTConfig(emb_dim=1600, n_layers=48, n_heads=25),
    # Trains on a laptop CPU in minutes (byte-level vocabulary: 256 bytes + end-of-text).
    "small": GPTConfig(vocab_size=257, context_length=128, emb_dim=128, n_heads=4,
                       n_layers=4, drop_rate=0.0, tie_embeddings=True),
    # Published shapes (the models' config.json files on the Hugging Face hub).
    "qwen3-0.6b": _qwen3(emb_dim=1024, n_layers=28, n_heads=16, ffn_dim=3072,
                         tie_embeddings=True),
    "qwen3-1.7b": _qwen3(emb_dim=2048, n_layers=28, n_heads=16, ffn_dim=6144,
                         tie_embeddings=True),
    "qwen3-4b": _qwen3(emb_dim=2560, n_layers=36, n_heads=32, ffn_dim=9728,
                       tie_embeddings=True),
    "qwen3-8b": _qwen3(emb_dim=4096, n_layers=36, n_heads=32, ffn_dim=12288),
    "llama-3.2-1b": _llama3(emb_dim=2048, n_layers=16, n_heads=32, ffn_dim=8192,
                            rope_factor=32.0, tie_embeddings=True),
    "llama-3.2-3b": _llama3(emb_dim=3072, n_layers=28, n_heads=24, ffn_dim=8192,
                            rope_factor=32.0, tie_embeddings=True),
    "llama-3.1-8b": _llama3(emb_dim=4096, n_layers=32, n_heads=32, ffn_dim=14336,
                            rope_factor=8.0),
}


def get_preset(name: str) -> GPTConfig:
    """A preset by name (see `PRESETS`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
