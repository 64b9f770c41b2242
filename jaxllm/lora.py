"""LoRA: low-rank adapters as a pure transformation of the parameter tree.

LoRA keeps the pretrained dense weights W frozen and trains, for chosen dense
layers, two small matrices A (in, r) and B (r, out), so that the layer computes
``x @ W + (alpha / r) * (x @ A) @ B``. B starts at zero, so training starts
from the unchanged model; far fewer parameters are trained and far less
optimizer state is kept.

Two conventions differ between the sources, and each is a choice here:

- the scale (`SCALES`): "peft" is alpha / r (the LoRA paper, PEFT and the
  appendix-E notebook of the book's repository); "book" is alpha itself,
  no division (the book's printed appendix E and its packaged
  `llms_from_scratch/appendix_e.py`, `self.alpha * (x @ self.A @ self.B)`);
  a number is an explicit scale;
- A's initialisation (`INITS`): "peft" draws U(+-1/sqrt(in)) (PEFT's
  `kaiming_uniform_(a=sqrt(5))` on lora_A.weight of shape (r, in)); "book"
  draws U(+-1/sqrt(r)) (the book's `kaiming_uniform_(a=sqrt(5))` on A of
  shape (in, r), whose fan-in torch takes to be r).

The book's appendix-E run (rank 16, alpha 16 on every linear layer of GPT-2
124M and its 768 x 2 class head, 2,666,528 parameters) is scale "book" and
init "book"; PEFT's LoraConfig is "peft" for both (the defaults). The scale
trains as a constant leaf of the tree, so a checkpoint holds it; adapter
files record both conventions (`save_adapters`).

Adapters are data, not a second model::

    adapters = init_lora(params, config, key, rank=16, targets="all")   # init="peft"
    #  {"blocks/0/attn/qkv": {"a": (3, 768, 16), "b": (3, 16, 768)},   # q, k, v split
    #   "blocks/0/ffn/fc":   {"a": (768, 16),    "b": (16, 3072)}, ...}
    p = with_adapters(params, adapters, alpha=32)   # scale="peft": alpha / r; each targeted
                                                    # dense dict gets "lora"
    state = init_train_state(p, tc, trainable=TRAINABLE)   # only the lora a/b leaves train
    merged = merge(p)                                 # plain GPT-2 parameters, W + (alpha/r) A B

A dense layer's parameter dict ``{"kernel", "bias"?}`` may carry ``"lora":
{"a", "b", "scale"}``; `jaxllm.model.dense` then adds `low_rank` beside the
frozen product. Everything that runs the model (the train step, `generate`
with its KV cache, `scan_layers`, bf16 compute, each `matmul_impl`) goes
through `dense`, so it sees the adapters without knowing of them. Training
with ``trainable=TRAINABLE`` gives the frozen weights no gradient and no
optimizer moments (`jaxllm.train.task`).

The fused qkv projection (emb, 3 emb) takes an adapter in one of two ways:
``qkv="split"`` (the default) gives q, k and v an adapter each, on their
column slices, stored stacked as A (3, emb, r) and B (3, r, emb); this is what
a model with separate query, key and value layers gets, it keeps the three
projections' updates independent of one another, and it is the convention of
the parameter counts LoRA is usually quoted with. ``qkv="fused"`` puts one
adapter on the whole kernel, A (emb, r) and B (r, 3 emb), as PEFT does on
GPT-2's ``c_attn``: fewer parameters, but q, k and v share one rank-r input
subspace.

With `tie_embeddings` the LM head is the token embedding, transposed, not a
dense layer; it still takes an adapter, A (emb, r) and B (r, vocab) as on an
untied head, stored at the same path: the tree gets ``"out_head": {"lora": ...}``
without a kernel, and `jaxllm.model.lm_head` adds ``scale * (x @ A) @ B`` to
``x @ E.T``. The input embedding is not adapted. Folding that adapter in
cannot leave the head tied without changing the input embedding, so it unties
the head: `merge_model` returns an ``out_head`` kernel ``E.T + scale * A B`` with
the config's `tie_embeddings` off (and `merge`, which returns no config,
refuses such a tree). A model whose LM head is replaced (a classifier) passes
``tied_head=False`` to `init_lora`. With
`scan_layers` every block must hold the same adapters (the blocks are stacked
into one tree); `init_lora` says so when the targets differ per block. On a
mesh, `sharding_rules(rules)` replicates the adapters by rule (the default
rules alone replicate them too, with a warning that they match no rule).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import GPTConfig

Adapters = dict[str, dict[str, Any]]

# Target presets: regexes over dense-layer paths ("blocks/3/attn/qkv", "out_head").
# "attn" and "ffn" cover every family; a layer's own name ("q", "gate", "qkv") selects
# it in every block: GPT-2's qkv, out, fc, proj; Llama's and Qwen3's q, k, v, o, gate,
# up, down (jaxllm.models).
ATTN_LAYERS = {"gpt2": ("qkv", "out"), "llama": ("q", "k", "v", "o")}
FFN_LAYERS = {"gpt2": ("fc", "proj"), "llama": ("gate", "up", "down")}
TARGET_PRESETS = {
    "attn": rf"blocks/\d+/attn/({'|'.join(n for f in ATTN_LAYERS.values() for n in f)})",
    "ffn": rf"blocks/\d+/ffn/({'|'.join(n for f in FFN_LAYERS.values() for n in f)})",
    "head": r"(?!blocks/).+",  # every dense layer outside the blocks: out_head or a task's head
    "all": r".+",
    **{name: rf"blocks/\d+/attn/{name}" for f in ATTN_LAYERS.values() for name in f},
    **{name: rf"blocks/\d+/ffn/{name}" for f in FFN_LAYERS.values() for name in f},
}
QKV_MODES = ("split", "fused")
TRAINABLE = r"(.+/)?lora/(a|b)"
"""The `trainable` regex of LoRA training: the adapters' A and B, nothing else."""


def trainable(also: str | None = None) -> str:
    """The `trainable` regex for the adapters plus, optionally, the leaves that
    `also` matches (a new task head trained in full, say: "class_head/.*")."""
    return TRAINABLE if also is None else f"(?:{TRAINABLE})|(?:{also})"


def trainable_label(regex: str) -> str:
    """A `trainable` regex as a reader would say it: "LoRA adapters + X" for
    what `trainable(X)` made, the regex itself otherwise."""
    if regex == TRAINABLE:
        return "LoRA adapters"
    prefix = f"(?:{TRAINABLE})|(?:"
    if regex.startswith(prefix) and regex.endswith(")"):
        return f"LoRA adapters + {regex[len(prefix):-1]}"
    return regex


# The base's GPTConfig fields an adapter file records. Adapters fit a base that agrees
# on the architecture (MODEL_FIELDS) and has a kernel of the saved shape at every adapted
# layer; the context length, vocabulary padding, qkv bias or a tied head of the base may
# differ where no adapted kernel depends on them.
BASE_FIELDS = ("vocab_size", "vocab_multiple", "context_length", "emb_dim", "n_heads",
               "n_layers", "ffn_dim", "qkv_bias", "tie_embeddings")
MODEL_FIELDS = ("vocab_size", "emb_dim", "n_heads", "n_layers", "ffn_dim")
FILE_FORMAT = "jaxllm-lora/1"

SCALES = {
    "peft": "alpha / rank: the LoRA paper, PEFT, the book's appendix-E notebook",
    "book": "alpha, no division: the book's printed appendix E and llms_from_scratch/appendix_e.py",
}
INITS = {
    "peft": "A ~ U(+-1/sqrt(in)): PEFT (kaiming_uniform_ on lora_A.weight, (r, in))",
    "book": "A ~ U(+-1/sqrt(rank)): the book (kaiming_uniform_ on A, (in, r))",
}


def check_scale(scale) -> None:
    """Refuse a scale that is neither a convention of `SCALES` nor a finite number > 0."""
    if isinstance(scale, str):
        if scale not in SCALES:
            raise ValueError(f"LoRA scale must be one of {sorted(SCALES)} or a number > 0, "
                             f"got {scale!r}")
    elif isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)) \
            or not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"an explicit LoRA scale must be a finite number > 0, got {scale!r}")


def lora_scale(alpha: float | None, rank: int, scale: str | float = "peft") -> float:
    """The factor on x @ A @ B: alpha / rank ("peft"), alpha ("book"), or
    `scale` itself when it is a number (alpha is then not used)."""
    check_scale(scale)
    if not isinstance(scale, str):
        return float(scale)
    if not (isinstance(alpha, (int, float, np.floating, np.integer))
            and not isinstance(alpha, bool) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"LoRA alpha must be a finite number > 0 (the adapters' scale is "
                         f"{'alpha / rank' if scale == 'peft' else 'alpha'}), got {alpha!r}")
    return float(alpha) / rank if scale == "peft" else float(alpha)


# -- the tree ------------------------------------------------------------------
def _key(k) -> str:
    return str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))


def dense_layers(params) -> dict[str, tuple[int, int]]:
    """{path: (in, out)} of every dense layer: each dict holding a 2-D "kernel"
    (arrays or `jax.ShapeDtypeStruct`s; nothing is computed)."""
    out: dict[str, tuple[int, int]] = {}

    def walk(node, path):
        if isinstance(node, Mapping):
            kernel = node.get("kernel")
            if kernel is not None and len(getattr(kernel, "shape", ())) == 2:
                out["/".join(path)] = tuple(int(d) for d in kernel.shape)
            for k, v in node.items():
                if k != "lora":
                    walk(v, (*path, str(k)))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, (*path, str(i)))

    walk(params, ())
    return out


def _get(tree, path: str):
    node = tree
    for part in path.split("/"):
        node = node[int(part)] if isinstance(node, (list, tuple)) else node[part]
    return node


def _replace(tree, path: str, fn):
    """A copy of `tree` with the node at `path` replaced by `fn(node)`; the
    containers on the way are copied, every other leaf is shared."""
    head, _, rest = path.partition("/")
    if isinstance(tree, (list, tuple)):
        i = int(head)
        items = list(tree)
        items[i] = _replace(items[i], rest, fn) if rest else fn(items[i])
        return type(tree)(items)
    new = dict(tree)
    new[head] = _replace(tree[head], rest, fn) if rest else fn(tree[head])
    return new


HEAD_PATH = "out_head"


def _tied_head_shape(params) -> tuple[int, int] | None:
    """(emb, padded vocab) of the LM head when it is the token embedding: a
    model tree with `tok_emb` and no dense `out_head` (only, maybe, its adapter)."""
    if not isinstance(params, Mapping) or "tok_emb" not in params \
            or "kernel" in params.get(HEAD_PATH, {}):
        return None
    vocab, emb = params["tok_emb"]["embedding"].shape
    return int(emb), int(vocab)


def _layers(params, tied_head: bool) -> dict[str, tuple[int, int]]:
    """`dense_layers`, plus the tied head at "out_head" when `tied_head` and the
    tree has one."""
    layers = dense_layers(params)
    shape = _tied_head_shape(params) if tied_head else None
    if shape is not None:
        layers[HEAD_PATH] = shape
    return layers


def _is_tied_head(params, path: str) -> bool:
    return path == HEAD_PATH and _tied_head_shape(params) is not None


def _is_qkv(path: str) -> bool:
    return path.rsplit("/", 1)[-1] == "qkv"


# -- targets and initialisation ------------------------------------------------
def target_regex(targets: str) -> str:
    """The regex a target selection stands for: a preset name ("attn", "ffn",
    "head", "all") or a layer's name ("q", "v", "gate", "qkv", ...), several
    joined by "," ("q,v" or "attn,ffn"), or a regex itself."""
    if not isinstance(targets, str) or not targets:
        raise ValueError(f"LoRA targets must be a preset {sorted(TARGET_PRESETS)} or a regex, "
                         f"got {targets!r}")
    names = [t.strip() for t in targets.split(",")]
    if all(n in TARGET_PRESETS for n in names):
        return "|".join(f"(?:{TARGET_PRESETS[n]})" for n in names)
    return targets


def select_targets(params, targets: str = "all", *, tied_head: bool = False) -> list[str]:
    """The dense-layer paths `targets` selects (the regex must match a whole
    path, "blocks/0/attn/qkv"; one matching "<path>/kernel" selects it too).
    With `tied_head`, a tied LM head counts as the dense layer "out_head"."""
    pattern = target_regex(targets)
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"LoRA target regex {pattern!r} does not compile: {e}") from None
    layers = _layers(params, tied_head)
    chosen = [p for p in layers if regex.fullmatch(p) or regex.fullmatch(f"{p}/kernel")]
    if not chosen:
        hint = ""
        if "out_head" not in layers and re.fullmatch(pattern, "out_head"):
            hint = " (the LM head is not part of this model: a task head replaces it)"
        raise ValueError(f"LoRA targets '{targets}' match no dense layer{hint}; dense layers: "
                         f"{', '.join(list(layers)[:6])}{', ...' if len(layers) > 6 else ''}")
    return chosen


def _kaiming_uniform(key, shape, fan_in: int, dtype):
    # torch.nn.init.kaiming_uniform_(w, a=sqrt(5)): gain sqrt(2 / (1 + 5)),
    # bound gain * sqrt(3 / fan_in) = 1 / sqrt(fan_in).
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def init_lora(params, config: GPTConfig, key: jax.Array, *, rank: int, targets: str = "all",
              qkv: str = "split", allow_rank_above_dim: bool = False,
              tied_head: bool = True, init: str = "peft") -> Adapters:
    """Fresh adapters {path: {"a", "b"}} for the dense layers `targets` selects
    (see `target_regex`): A Kaiming-uniform by the `init` convention ("peft":
    U(+-1/sqrt(in)), "book": U(+-1/sqrt(rank)); see `INITS`), B zeros, in
    `config.param_dtype`. `qkv` is "split" (default: one adapter each for q, k
    and v, A (3, in, r), B (3, r, emb)) or "fused" (one on the whole
    projection); the module docstring says why. A rank above a layer's smaller
    dimension gives a warning, since that adapter costs more than training the
    layer itself, unless `allow_rank_above_dim` (the book's rank 16 on a 2-class
    head, say). With `config.tie_embeddings` the LM head is a target ("out_head",
    in the presets "head" and "all") unless `tied_head=False` (a model that
    replaces the LM head). `params` may be `jax.ShapeDtypeStruct`s (only shapes
    are read)."""
    if qkv not in QKV_MODES:
        raise ValueError(f"qkv must be one of {QKV_MODES}, got {qkv!r}")
    if init not in INITS:
        raise ValueError(f"LoRA init must be one of {sorted(INITS)}, got {init!r}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    rank = int(rank)
    tied_head = bool(tied_head and config.tie_embeddings)
    layers = _layers(params, tied_head)
    chosen = select_targets(params, targets, tied_head=tied_head)
    dtype = jnp.dtype(config.param_dtype)
    adapters: Adapters = {}
    for i, path in enumerate(chosen):
        d_in, d_out = layers[path]
        slices = 3 if qkv == "split" and _is_qkv(path) else 1
        if d_out % slices:
            raise ValueError(f"{path}: {d_out} output columns do not split into q, k and v")
        width = d_out // slices
        if rank > min(d_in, width) and not allow_rank_above_dim:
            warnings.warn(f"LoRA rank {rank} exceeds the smaller dimension of {path} "
                          f"({d_in} x {width}{' per q/k/v slice' if slices > 1 else ''}): its "
                          "adapter has more parameters than the layer; lower the rank "
                          "(--lora-rank) or leave the layer out of the targets (--lora-targets)",
                          stacklevel=2)
        k = jax.random.fold_in(key, i)
        lead = (slices,) if slices > 1 else ()
        fan_in = d_in if init == "peft" else rank
        adapters[path] = {"a": _kaiming_uniform(k, (*lead, d_in, rank), fan_in, dtype),
                          "b": jnp.zeros((*lead, rank, width), dtype)}
    if config.scan_layers:
        _check_same_in_every_block(adapters, config)
    return adapters


def _check_same_in_every_block(adapters: Adapters, config: GPTConfig) -> None:
    # scan_layers stacks the blocks into one tree: every block must hold the same adapters.
    per_block: dict[int, set[str]] = {i: set() for i in range(config.n_layers)}
    for path in adapters:
        m = re.fullmatch(r"blocks/(\d+)/(.+)", path)
        if m:
            per_block[int(m.group(1))].add(m.group(2))
    shapes = {frozenset(v) for v in per_block.values()}
    if len(shapes) > 1:
        raise ValueError("scan_layers stacks the blocks, so every block needs the same adapters; "
                         "the targets select different layers in different blocks: "
                         + "; ".join(f"block {i}: {sorted(v) or 'none'}"
                                     for i, v in per_block.items()))


def count_lora_params(adapters: Adapters) -> int:
    """Number of adapter parameters (what LoRA trains)."""
    return sum(int(np.prod(x.shape)) for ab in adapters.values() for x in ab.values())


# -- adapters in the parameter tree --------------------------------------------
def _check_fits(path: str, ab, kernel_shape) -> None:
    a, b = ab["a"], ab["b"]
    d_in, d_out = kernel_shape
    slices = a.shape[0] if a.ndim == 3 else 1
    ok = (a.ndim == b.ndim and a.ndim in (2, 3) and a.shape[-2] == d_in
          and b.shape[-2] == a.shape[-1] and b.shape[-1] * slices == d_out
          and (a.ndim == 2 or b.shape[0] == slices))
    if not ok:
        raise ValueError(f"adapter {path} (A {tuple(a.shape)}, B {tuple(b.shape)}) does not fit "
                         f"the kernel {tuple(kernel_shape)}")


def with_adapters(params, adapters: Adapters, alpha: float | None,
                  scale: str | float = "peft"):
    """`params` with each adapted dense dict carrying "lora": {"a", "b", "scale"},
    the scale a float32 scalar: alpha / rank ("peft", default), alpha ("book")
    or `scale` itself when it is a number (see `SCALES`); a tied head's adapter
    becomes "out_head": {"lora"}. The base leaves are shared, not copied."""
    lora_scale(alpha, 1, scale)  # a bad alpha or scale is named before any layer
    layers = _layers(params, tied_head=True)
    out = params
    for path, ab in adapters.items():
        if path not in layers:
            raise ValueError(f"adapter {path} has no dense layer in the parameters "
                             f"(dense layers: {', '.join(list(layers)[:6])}, ...)")
        _check_fits(path, ab, layers[path])
        rank = ab["a"].shape[-1]
        lora = {"a": ab["a"], "b": ab["b"],
                "scale": jnp.asarray(lora_scale(alpha, rank, scale), jnp.float32)}
        if _is_tied_head(out, path):
            out = {**out, HEAD_PATH: {"lora": lora}}
        else:
            out = _replace(out, path, lambda d, lora=lora: {**d, "lora": lora})
    return out


def adapters_of(params) -> tuple[Adapters, dict[str, float]]:
    """(adapters, {path: scale}) held in a tree made by `with_adapters` (or in a
    gradient or other tree shaped like one)."""
    adapters: Adapters = {}
    scales: dict[str, float] = {}

    def walk(node, path):
        if isinstance(node, Mapping):
            if "lora" in node:
                name = "/".join(path)
                adapters[name] = {"a": node["lora"]["a"], "b": node["lora"]["b"]}
                scale = node["lora"].get("scale")
                scales[name] = None if scale is None else float(scale)  # None in a gradient tree
            for k, v in node.items():
                if k != "lora":
                    walk(v, (*path, str(k)))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, (*path, str(i)))

    walk(params, ())
    return adapters, scales


def strip_adapters(params):
    """`params` without their "lora" entries: the frozen base."""
    out = params
    for path in adapters_of(params)[0]:
        if _is_tied_head(out, path):
            out = {k: v for k, v in out.items() if k != HEAD_PATH}
        else:
            out = _replace(out, path, lambda d: {k: v for k, v in d.items() if k != "lora"})
    return out


def low_rank(lora, x, ops):
    """scale * (x @ A) @ B for 2-D x: the adapter's path beside the frozen product
    (for a split adapter, the q, k and v slices side by side). The scale is
    applied to the (n, r) product, the smallest array on the way."""
    a, b, scale = lora["a"], lora["b"], lora["scale"].astype(x.dtype)
    if a.ndim == 2:
        return ops.matmul(ops.matmul(x, a) * scale, b)
    s, d, r = a.shape
    xa = ops.matmul(x, a.transpose(1, 0, 2).reshape(d, s * r)) * scale  # all slices' A at once
    return jnp.concatenate([ops.matmul(xa[:, i * r:(i + 1) * r], b[i]) for i in range(s)], axis=-1)


def _delta(ab) -> jax.Array:
    """A @ B as a (in, out) float32 matrix."""
    a, b = jnp.asarray(ab["a"], jnp.float32), jnp.asarray(ab["b"], jnp.float32)
    if a.ndim == 2:
        return a @ b
    return jnp.concatenate([a[i] @ b[i] for i in range(a.shape[0])], axis=-1)


TIED_MERGE = ("the LM head is tied to the token embedding: folding its adapter in unties "
              "it (the input embedding stays as it is), so the config changes too; use "
              "jaxllm.lora.merge_model(params, config), which returns both")


def _fold(params, adapters: Adapters, scales: Mapping[str, float], sign: float,
          untie: bool = False):
    layers = _layers(params, tied_head=True)
    out = params
    for path, ab in adapters.items():
        if path not in layers:
            raise ValueError(f"adapter {path} has no dense layer in the parameters")
        _check_fits(path, ab, layers[path])
        if _is_tied_head(out, path):
            if not untie:
                raise ValueError(TIED_MERGE)
            emb = out["tok_emb"]["embedding"]  # the head, as a dense kernel of its own
            out = {**out, HEAD_PATH: {"kernel": jnp.asarray(emb).T}}

        def fold(d, ab=ab, s=sign * scales[path]):
            k = d["kernel"]
            merged = (jnp.asarray(k, jnp.float32) + s * _delta(ab)).astype(k.dtype)
            return {**{n: v for n, v in d.items() if n != "lora"}, "kernel": merged}

        out = _replace(out, path, fold)
    return out


def _scales(adapters: Adapters, alpha: float | None, scale: str | float = "peft"
            ) -> dict[str, float]:
    return {p: lora_scale(alpha, ab["a"].shape[-1], scale) for p, ab in adapters.items()}


def _merged(params, adapters, alpha, untie: bool, scale: str | float = "peft"):
    if adapters is None:
        adapters, scales = adapters_of(params)
        if not adapters:
            raise ValueError("merge: the parameters carry no adapters; pass adapters and alpha")
        return _fold(params, adapters, scales, 1.0, untie)
    if alpha is None and isinstance(scale, str):
        raise ValueError("merge: alpha (or a numeric scale) is needed with separate adapters")
    return _fold(params, adapters, _scales(adapters, alpha, scale), 1.0, untie)


def merge(params, adapters: Adapters | None = None, alpha: float | None = None,
          scale: str | float = "peft"):
    """Plain parameters with the adapters folded in: W + s A B (in float32,
    stored in W's dtype). Either `params` carries them (a tree from
    `with_adapters`, with each adapter's own scale; they are removed), or pass
    the base with `adapters`, `alpha` and the `scale` convention (s = alpha / r
    for "peft", the rank read from A's shape; see `lora_scale`). An adapter on
    a tied head is refused: it unties the head, see `merge_model`."""
    return _merged(params, adapters, alpha, untie=False, scale=scale)


def merge_model(params, config: GPTConfig, adapters: Adapters | None = None,
                alpha: float | None = None, scale: str | float = "peft"
                ) -> tuple[Any, GPTConfig]:
    """(params, config) with the adapters folded in, as `merge`; an adapter on a
    tied head unties it: "out_head" gets the kernel E.T + (alpha / r) A B, the
    token embedding E stays the input embedding, and the config comes back with
    `tie_embeddings=False` (a Hugging Face export then writes its own
    lm_head.weight)."""
    tied = config.tie_embeddings and _tied_head_shape(params) is not None and (
        HEAD_PATH in (adapters if adapters is not None else adapters_of(params)[0]))
    merged = _merged(params, adapters, alpha, untie=tied, scale=scale)
    return merged, config.replace(tie_embeddings=False) if tied else config


def unmerge(params, adapters: Adapters, alpha: float | None, scale: str | float = "peft"):
    """The inverse of `merge`: W - s A B (exact up to rounding). A head that
    `merge_model` untied stays untied (its kernel goes back to E.T)."""
    return _fold(params, adapters, _scales(adapters, alpha, scale), -1.0)


def untie_head(params, config: GPTConfig):
    """(params, config) with the tied head made a dense `out_head` (a copy of
    the token embedding, transposed): a head trained apart from the embedding.
    (An adapter does not need it: a tied head takes one as it is.)"""
    if not config.tie_embeddings:
        return params, config
    out = dict(params)
    out["out_head"] = {"kernel": jnp.asarray(params["tok_emb"]["embedding"]).T}
    return out, config.replace(tie_embeddings=False)


def lora_params(params, config: GPTConfig, key: jax.Array, *, rank: int, alpha: float | None = None,
                targets: str = "all", qkv: str = "split", allow_rank_above_dim: bool = False,
                tied_head: bool = True, scale: str | float = "peft", init: str = "peft"):
    """`with_adapters(params, init_lora(...), alpha, scale)`; alpha defaults to
    the rank."""
    adapters = init_lora(params, config, key, rank=rank, targets=targets, qkv=qkv,
                         allow_rank_above_dim=allow_rank_above_dim, tied_head=tied_head,
                         init=init)
    return with_adapters(params, adapters, float(rank if alpha is None else alpha), scale)


def sharding_rules(rules=None):
    """Partition rules for a tree with adapters: `rules` (default
    `jaxllm.sharding.DEFAULT_RULES`) first, so that a rule of the user's can
    shard an adapter, then A, B and the scale of every other adapter
    replicated (they are small)."""
    from jax.sharding import PartitionSpec as P

    from jaxllm import sharding

    return (*(sharding.DEFAULT_RULES if rules is None else rules),
            (r"(.+/)?lora/(a|b|scale)", P()))


# -- files ---------------------------------------------------------------------
def save_adapters(path: str | os.PathLike, adapters: Adapters, alpha: float | None,
                  config: GPTConfig, *, scale: str | float = "peft", init: str | None = None,
                  **info) -> None:
    """An adapter-only safetensors file: "<layer>/a" and "<layer>/b" (float32),
    with alpha, the scale convention (and each layer's scale), A's init
    convention when known, the base's shape-deciding config fields and each
    adapted kernel's shape as metadata, so that `load_adapters` can check a
    base and rebuild the same layers."""
    from safetensors.numpy import save_file

    if init is not None and init not in INITS:
        raise ValueError(f"LoRA init must be one of {sorted(INITS)}, got {init!r}")
    scales = _scales(adapters, alpha, scale)
    tensors = {f"{p}/{n}": np.ascontiguousarray(np.asarray(x, np.float32))
               for p, ab in adapters.items() for n, x in ab.items()}
    kernels = {p: [int(ab["a"].shape[-2]), int(ab["b"].shape[-1]) *
                   (int(ab["a"].shape[0]) if ab["a"].ndim == 3 else 1)]
               for p, ab in adapters.items()}
    meta = {"format": FILE_FORMAT, "alpha": json.dumps(None if alpha is None else float(alpha)),
            "scale": json.dumps(scale if isinstance(scale, str) else float(scale)),
            "scales": json.dumps(scales), "init": json.dumps(init),
            "base": json.dumps({f: getattr(config, f) for f in BASE_FIELDS}),
            "kernels": json.dumps(kernels), "info": json.dumps(info)}
    save_file(tensors, os.fspath(path), metadata=meta)


def read_adapters(path: str | os.PathLike) -> tuple[Adapters, float | None, dict[str, Any]]:
    """(adapters, alpha, metadata) of a `save_adapters` file, unchecked; the
    metadata's "scale" and "init" are the conventions (a file from before they
    were recorded: "peft" scale, init unknown), "scales" each layer's scale."""
    from safetensors import safe_open

    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"adapter file {path} is a folder; give the .safetensors file "
                         "(jaxllm lora export writes one)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"adapter file {path} does not exist")
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FILE_FORMAT:
                raise ValueError(f"{path} is not a jaxllm adapter file (format "
                                 f"{meta.get('format')!r}, expected {FILE_FORMAT!r})")
            adapters: Adapters = {}
            for name in f.keys():
                layer, _, part = name.rpartition("/")
                adapters.setdefault(layer, {})[part] = jnp.asarray(f.get_tensor(name))
        alpha = json.loads(meta["alpha"])
        scale = json.loads(meta.get("scale", '"peft"'))
        meta = {"alpha": None if alpha is None else float(alpha), "scale": scale,
                "scales": json.loads(meta["scales"]) if "scales" in meta
                else _scales(adapters, alpha, scale),
                "init": json.loads(meta.get("init", "null")), "base": json.loads(meta["base"]),
                "kernels": json.loads(meta["kernels"]),
                "info": json.loads(meta.get("info", "{}"))}
        if set(meta["scales"]) != set(adapters):
            raise ValueError(f"adapter file {path}: its scales name other layers than its "
                             "tensors")
    except json.JSONDecodeError as err:
        raise ValueError(f"adapter file {path}: its metadata is not JSON ({err})") from None
    except ValueError:
        raise
    except (KeyError, TypeError) as err:
        raise ValueError(f"adapter file {path}: its metadata lacks or garbles {err}") from None
    except Exception as err:  # safetensors' own errors: a truncated or foreign file
        raise ValueError(f"adapter file {path} is damaged or not a safetensors file "
                         f"({type(err).__name__}: {str(err)[:120]})") from None
    return adapters, meta["alpha"], meta


def load_adapters(path: str | os.PathLike, params, config: GPTConfig):
    """`params` with the adapters of a `save_adapters` file inserted (in the
    base's parameter dtype), each with the scale the file records. A base of
    another shape is refused, naming the config fields and layers that differ."""
    adapters, alpha, meta = read_adapters(path)
    diffs = [f"{f}: adapters {meta['base'].get(f)!r}, base {getattr(config, f)!r}"
             for f in MODEL_FIELDS if meta["base"].get(f) != getattr(config, f)]
    layers = _layers(params, tied_head=config.tie_embeddings)
    for layer, shape in meta["kernels"].items():
        if layer not in layers:
            diffs.append(f"{layer}: in the adapters, not a dense layer of the base")
        elif list(layers[layer]) != shape:
            diffs.append(f"{layer}: kernel {tuple(shape)} for the adapters, "
                         f"{layers[layer]} in the base")
    if diffs:
        raise ValueError(f"adapter file {os.fspath(path)} was made for another base model:\n  "
                         + "\n  ".join(diffs))
    if config.scan_layers:
        _check_same_in_every_block(adapters, config)
    dtype = jnp.dtype(config.param_dtype)
    out = params
    for p, ab in adapters.items():
        out = with_adapters(out, {p: {n: x.astype(dtype) for n, x in ab.items()}}, None,
                            float(meta["scales"][p]))
    return out
