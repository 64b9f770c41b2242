"""The parameter layout: one table per family naming every parameter of its tree.

`init_params` decides which parameters exist and their shapes; `PARAMS` adds
what the rest of the library needs to know about each of them: its Hugging
Face name and orientation, and whether it is a matrix (split by FSDP) or a
vector (replicated). Parameter counts (`param_shapes`), the Hugging Face key
map (`jaxllm.hf`), the default partition rules (`jaxllm.sharding`) and
restore targets (`abstract_params`) are all read from here, so a new
parameter is added in `init_params` and in one row below.

Paths are the tree's keys joined by "/"; in block rows ``*`` stands for the
block index, in our paths as in the Hugging Face names. `PARAMS` is GPT-2's
table (`GPT2LMHeadModel`'s names), `LLAMA_PARAMS` that of Llama 3 and Qwen3
(`LlamaForCausalLM` / `Qwen3ForCausalLM`); `table(config)` picks one.
This module sits above `jaxllm.models` (whose `init_params` it reads) and
below `jaxllm.model`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

import jax

from jaxllm.config import GPTConfig
from jaxllm.models import family
from jaxllm.tree import path_str

MATRIX, VECTOR = "matrix", "vector"


@dataclasses.dataclass(frozen=True)
class Param:
    """One row of the layout.

    `vocab_axis` is the axis of our array that runs over the vocabulary: it
    holds `padded_vocab_size` rows here and `vocab_size` in Hugging Face's
    file. `transposed`: Hugging Face stores the transpose of our array.
    `only_if=(field, value)`: the parameter exists only when the config field
    has that value. `hf_absent` says what Hugging Face keeps in its place when
    our tree lacks it: "zeros" (GPT-2 always has `c_attn.bias`), the path of
    the parameter it is tied to, or None: Hugging Face lacks it too.
    """

    path: str
    hf: str
    kind: str
    vocab_axis: int | None = None
    transposed: bool = False
    only_if: tuple[str, Any] | None = None
    hf_absent: str | None = None

    def present(self, config: GPTConfig) -> bool:
        return self.only_if is None or getattr(config, self.only_if[0]) == self.only_if[1]

    def at(self, layer: int) -> "Param":
        """This row for block `layer` (the row itself outside the blocks)."""
        return dataclasses.replace(self, path=self.path.replace("*", str(layer)),
                                   hf=self.hf.replace("*", str(layer)))


# In the tree's order. Hugging Face's Conv1D weights are (in, out), as ours.
PARAMS: tuple[Param, ...] = (
    Param("tok_emb/embedding", "transformer.wte.weight", MATRIX, vocab_axis=0),
    Param("pos_emb/embedding", "transformer.wpe.weight", MATRIX),
    Param("blocks/*/norm1/scale", "transformer.h.*.ln_1.weight", VECTOR),
    Param("blocks/*/norm1/bias", "transformer.h.*.ln_1.bias", VECTOR),
    Param("blocks/*/attn/qkv/kernel", "transformer.h.*.attn.c_attn.weight", MATRIX),
    Param("blocks/*/attn/qkv/bias", "transformer.h.*.attn.c_attn.bias", VECTOR,
          only_if=("qkv_bias", True), hf_absent="zeros"),
    Param("blocks/*/attn/out/kernel", "transformer.h.*.attn.c_proj.weight", MATRIX),
    Param("blocks/*/attn/out/bias", "transformer.h.*.attn.c_proj.bias", VECTOR),
    Param("blocks/*/norm2/scale", "transformer.h.*.ln_2.weight", VECTOR),
    Param("blocks/*/norm2/bias", "transformer.h.*.ln_2.bias", VECTOR),
    Param("blocks/*/ffn/fc/kernel", "transformer.h.*.mlp.c_fc.weight", MATRIX),
    Param("blocks/*/ffn/fc/bias", "transformer.h.*.mlp.c_fc.bias", VECTOR),
    Param("blocks/*/ffn/proj/kernel", "transformer.h.*.mlp.c_proj.weight", MATRIX),
    Param("blocks/*/ffn/proj/bias", "transformer.h.*.mlp.c_proj.bias", VECTOR),
    Param("final_norm/scale", "transformer.ln_f.weight", VECTOR),
    Param("final_norm/bias", "transformer.ln_f.bias", VECTOR),
    Param("out_head/kernel", "lm_head.weight", MATRIX, vocab_axis=1, transposed=True,
          only_if=("tie_embeddings", False), hf_absent="tok_emb/embedding"),
)


# Llama 3 and Qwen3. Hugging Face's nn.Linear weights are (out, in): transposed.
LLAMA_PARAMS: tuple[Param, ...] = (
    Param("tok_emb/embedding", "model.embed_tokens.weight", MATRIX, vocab_axis=0),
    Param("blocks/*/norm1/scale", "model.layers.*.input_layernorm.weight", VECTOR),
    Param("blocks/*/attn/q/kernel", "model.layers.*.self_attn.q_proj.weight", MATRIX,
          transposed=True),
    Param("blocks/*/attn/k/kernel", "model.layers.*.self_attn.k_proj.weight", MATRIX,
          transposed=True),
    Param("blocks/*/attn/v/kernel", "model.layers.*.self_attn.v_proj.weight", MATRIX,
          transposed=True),
    Param("blocks/*/attn/o/kernel", "model.layers.*.self_attn.o_proj.weight", MATRIX,
          transposed=True),
    Param("blocks/*/attn/q_norm/scale", "model.layers.*.self_attn.q_norm.weight", VECTOR,
          only_if=("qk_norm", True)),
    Param("blocks/*/attn/k_norm/scale", "model.layers.*.self_attn.k_norm.weight", VECTOR,
          only_if=("qk_norm", True)),
    Param("blocks/*/norm2/scale", "model.layers.*.post_attention_layernorm.weight", VECTOR),
    Param("blocks/*/ffn/gate/kernel", "model.layers.*.mlp.gate_proj.weight", MATRIX,
          transposed=True),
    Param("blocks/*/ffn/up/kernel", "model.layers.*.mlp.up_proj.weight", MATRIX,
          transposed=True),
    Param("blocks/*/ffn/down/kernel", "model.layers.*.mlp.down_proj.weight", MATRIX,
          transposed=True),
    Param("final_norm/scale", "model.norm.weight", VECTOR),
    Param("out_head/kernel", "lm_head.weight", MATRIX, vocab_axis=1, transposed=True,
          only_if=("tie_embeddings", False), hf_absent="tok_emb/embedding"),
)


def table(config: GPTConfig) -> tuple[Param, ...]:
    """The rows of the config's family."""
    return PARAMS if config.family == "gpt2" else LLAMA_PARAMS


def rows(config: GPTConfig, *, every: bool = False) -> list[Param]:
    """The table expanded over the config's blocks, in tree order: the rows
    present in the config's tree, or with `every` also those Hugging Face
    keeps where ours are absent (`hf_absent`: GPT-2's zero qkv bias, a tied
    head's `lm_head.weight`)."""
    chosen = [p for p in table(config)
              if p.present(config) or (every and p.hf_absent is not None)]
    block = [p for p in chosen if "*" in p.path]  # contiguous in PARAMS
    start = chosen.index(block[0])
    return (chosen[:start] + [p.at(i) for i in range(config.n_layers) for p in block]
            + chosen[start + len(block):])


# -- shapes, from init_params ----------------------------------------------------
@functools.lru_cache(maxsize=64)
def _abstract(config: GPTConfig):
    key = jax.eval_shape(jax.random.key, 0)
    tree = jax.eval_shape(functools.partial(family(config).init_params, config), key)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    leaves = tuple((path_str(path), leaf) for path, leaf in leaves)
    named, built = {p.path for p in rows(config)}, {name for name, _ in leaves}
    if named != built:  # a parameter was added to init_params or PARAMS but not both
        raise AssertionError(f"jaxllm.layout.{'PARAMS' if config.family == 'gpt2' else 'LLAMA_PARAMS'} and init_params disagree: not in the table "
                             f"{sorted(built - named)}, not built {sorted(named - built)}")
    return leaves, treedef


def abstract_params(config: GPTConfig):
    """The tree of `init_params(config, key)` as `jax.ShapeDtypeStruct`s, nothing
    allocated (and no device touched): a target to restore parameters into."""
    leaves, treedef = _abstract(config)
    return jax.tree_util.tree_unflatten(treedef, [leaf for _, leaf in leaves])


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter, keyed by its path, in tree order."""
    shapes = {name: tuple(leaf.shape) for name, leaf in _abstract(config)[0]}
    return {p.path: shapes[p.path] for p in rows(config)}


def check_params(params, config: GPTConfig, *, skip: tuple[str, ...] = ()) -> None:
    """Every parameter of the config's model must be in `params` with its shape
    (a ValueError names the first that is not); extra leaves (a task head,
    adapters) are the caller's own, and paths starting with `skip` (a head a
    task replaced) are not asked for."""
    have = {path_str(p): tuple(leaf.shape)
            for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path, shape in param_shapes(config).items():
        if path.startswith(skip):
            continue
        if path not in have:
            raise ValueError(f"the starting parameters do not match the model config: no {path}")
        if have[path] != tuple(shape):
            raise ValueError(f"the starting parameters do not match the model config: {path} "
                             f"has shape {have[path]}, the config gives {tuple(shape)}")


def unflatten(config: GPTConfig, values: dict[str, Any]):
    """The parameter tree of `config` with the leaf at each path from `values`."""
    leaves, treedef = _abstract(config)
    return jax.tree_util.tree_unflatten(treedef, [values[name] for name, _ in leaves])


def hf_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face key -> shape: every row their model has (`rows(every=True)`),
    unpadded vocabulary, in their orientation."""
    kept = {p.only_if for p in rows(config, every=True) if not p.present(config)}
    full = config.replace(vocab_multiple=1, **dict(kept))
    shapes = param_shapes(full)
    return {p.hf: shapes[p.path][::-1] if p.transposed else shapes[p.path]
            for p in rows(config, every=True)}


# -- partition rules ---------------------------------------------------------------
def _regex(path: str) -> str:
    return r"\d+".join(re.escape(part) for part in path.split("*"))


def rule_patterns() -> list[tuple[str, str]]:
    """(regex over paths, kind) for the default partition rules: one per matrix
    in table order (GPT-2's, then the Llama family's not already named), then
    one for every vector by its leaf name (so the biases of a new head are
    replicated too)."""
    every = PARAMS + LLAMA_PARAMS
    matrices = list(dict.fromkeys(_regex(p.path) for p in every if p.kind == MATRIX))
    names = sorted({p.path.rsplit("/", 1)[1] for p in every if p.kind == VECTOR})
    matrices = [(m, MATRIX) for m in matrices]
    return matrices + [(f".*/({'|'.join(names)})", VECTOR)]


def rule_families() -> dict[str, frozenset[str]]:
    """The regex of each default matrix rule -> the families whose table has
    that parameter ("gpt2", "llama"): a rule of a family other than a tree's
    is expected to match nothing in it."""
    out: dict[str, set[str]] = {}
    for family, rows_ in (("gpt2", PARAMS), ("llama", LLAMA_PARAMS)):
        for p in rows_:
            if p.kind == MATRIX:
                out.setdefault(_regex(p.path), set()).add(family)
    return {k: frozenset(v) for k, v in out.items()}
