"""The GPT configuration: a frozen, hashable dataclass and the GPT-2 presets.

A `GPTConfig` holds two kinds of field. The architecture fields (the seed's
seven keys plus `ffn_dim`, `tie_embeddings` and `ln_eps`) decide the
parameter shapes and the function the model computes. The implementation
fields (`attn_impl`, `matmul_impl`, `norm_impl`, `loss_impl`, dtypes,
`scan_layers`, `remat`, `vocab_multiple`; see `jaxllm.ops`) only
change how XLA computes the same function, and every one of them is tested
for equality with the reference path. Because the config is hashable it can
be passed to `jax.jit` as a static argument.
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
    ln_eps: float = 1e-5
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
        return self.emb_dim // self.n_heads

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
                "qkv_bias", "ffn_dim", "tie_embeddings")
        d = {k: getattr(self, k) for k in keep}
        d["ffn_dim"] = self.hidden_dim
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
    if c.emb_dim % c.n_heads:
        raise ValueError(
            f"GPTConfig.emb_dim ({c.emb_dim}) must be divisible by n_heads ({c.n_heads})")
    rate = expect("drop_rate", (int, float), "a number in [0, 1)")
    if not (0.0 <= rate < 1.0) or math.isnan(rate):
        raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {rate!r}")
    for name in ("qkv_bias", "tie_embeddings", "scan_layers"):
        expect(name, (bool,), "a bool")
    eps = expect("ln_eps", (int, float), "a positive number")
    if not eps > 0:
        raise ValueError(f"GPTConfig.ln_eps must be positive, got {eps!r}")
    for name, allowed in (("attn_impl", ATTN_IMPLS), ("param_dtype", DTYPES),
                          ("compute_dtype", DTYPES), ("remat", REMAT_POLICIES),
                          ("matmul_impl", MATMUL_IMPLS), ("norm_impl", NORM_IMPLS),
                          ("loss_impl", LOSS_IMPLS)):
        value = expect(name, (str,), f"one of {allowed}")
        if value not in allowed:
            raise ValueError(f"GPTConfig.{name} must be one of {allowed}, got {value!r}")
    for name, native, alternative in NATIVE_KERNEL_FIELDS:
        if getattr(c, name) == native and c.compute_dtype != "float32":
            raise ValueError(f"GPTConfig.{name}={native!r} computes in float32, but compute_dtype is "
                             f"{c.compute_dtype!r}; use {name}={alternative!r} for low-precision "
                             "compute")


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
}


def get_preset(name: str) -> GPTConfig:
    """A preset by name (see `PRESETS`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}") from None
