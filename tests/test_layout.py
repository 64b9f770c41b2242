"""One parameter layout: shapes, the Hugging Face key map and the default
partition rules all agree with the tree `init_params` builds."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import layout
from jaxllm import sharding as sh
from jaxllm.config import GPTConfig, param_shapes
from jaxllm.hf import from_hf_state_dict, to_hf_state_dict
from jaxllm.model import init_params
from jaxllm.train.task import path_str

BASE = GPTConfig(vocab_size=100, context_length=16, emb_dim=32, n_heads=4, n_layers=3,
                 drop_rate=0.0)
CONFIGS = {
    "untied": BASE,
    "tied": BASE.replace(tie_embeddings=True),
    "qkv_bias": BASE.replace(qkv_bias=True),
    "tied_qkv_bias": BASE.replace(qkv_bias=True, tie_embeddings=True),
    "padded": BASE.replace(vocab_multiple=64),
    "padded_tied": BASE.replace(vocab_multiple=64, tie_embeddings=True),
    "scan_layers": BASE.replace(scan_layers=True, ffn_dim=48),
    "bfloat16": BASE.replace(param_dtype="bfloat16", qkv_bias=True),
    "llama": BASE.replace(norm="rmsnorm", positions="rope", mlp="swiglu", out_bias=False,
                          mlp_bias=False, n_kv_heads=2, rope_scaling="llama3", ffn_dim=48),
    "qwen3_tied_padded": BASE.replace(norm="rmsnorm", positions="rope", mlp="swiglu",
                                      out_bias=False, mlp_bias=False, n_kv_heads=2, head_size=12,
                                      qk_norm=True, tie_embeddings=True, vocab_multiple=64),
}
configs = pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))


def leaves(tree) -> dict:
    return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def random_params(config: GPTConfig, seed: int = 0):
    """Every leaf random (biases and scales too), so a round trip cannot pass on zeros."""
    params = init_params(config, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), len(jax.tree.leaves(params))))
    return jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape).astype(a.dtype), params)


@configs
def test_param_shapes_are_those_of_init_params(config):
    real = {k: tuple(a.shape) for k, a in leaves(init_params(config, jax.random.key(0))).items()}
    assert param_shapes(config) == real
    assert list(param_shapes(config)) == [p.path for p in layout.rows(config)]


@configs
def test_abstract_params_match_init_params(config):
    real = init_params(config, jax.random.key(0))
    abstract = layout.abstract_params(config)
    assert jax.tree.structure(abstract) == jax.tree.structure(real)
    assert all(a.shape == r.shape and a.dtype == r.dtype
               for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(real)))


@configs
def test_table_names_every_leaf_once_with_its_kind(config):
    names = leaves(init_params(config, jax.random.key(0)))
    rows = layout.rows(config)
    assert sorted(p.path for p in rows) == sorted(names)  # every leaf, each once
    assert len({p.hf for p in layout.rows(config, every=True)}) == len(layout.rows(config, every=True))
    for p in rows:
        assert names[p.path].ndim == (2 if p.kind == layout.MATRIX else 1), p.path


def test_scan_layers_does_not_change_the_tree():
    assert param_shapes(BASE.replace(scan_layers=True)) == param_shapes(BASE)


@configs
def test_hf_round_trip_is_bitwise(config):
    params = random_params(config)
    sd = to_hf_state_dict(params, config)
    assert {k: v.shape for k, v in sd.items()} == layout.hf_shapes(config)
    back = from_hf_state_dict(sd, config)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    a, b = leaves(params), leaves(back)
    for name, x in a.items():
        y = b[name]
        if name in ("tok_emb/embedding", "out_head/kernel"):  # padding rows come back as zeros
            axis = 0 if name == "tok_emb/embedding" else 1
            x = jnp.take(x, jnp.arange(config.vocab_size), axis=axis)
            pad = jnp.take(y, jnp.arange(config.vocab_size, config.padded_vocab_size), axis=axis)
            assert not np.any(np.asarray(pad, np.float32)), name
            y = jnp.take(y, jnp.arange(config.vocab_size), axis=axis)
        assert y.dtype == x.dtype and np.array_equal(np.asarray(x), np.asarray(y)), name


def test_hf_orientation_and_vocab():
    config = CONFIGS["padded"]
    params = random_params(config)
    sd = to_hf_state_dict(params, config)
    head = np.asarray(params["out_head"]["kernel"])
    assert sd["lm_head.weight"].shape == (100, 32) and head.shape == (32, 128)
    np.testing.assert_array_equal(sd["lm_head.weight"], head[:, :100].T)
    np.testing.assert_array_equal(sd["transformer.h.1.mlp.c_fc.weight"],  # Conv1D: (in, out)
                                  np.asarray(params["blocks"][1]["ffn"]["fc"]["kernel"]))
    tied = CONFIGS["tied"]
    sd = to_hf_state_dict(random_params(tied), tied)
    assert sd["lm_head.weight"] is sd["transformer.wte.weight"]
    assert not np.any(sd["transformer.h.0.attn.c_attn.bias"])


@configs
def test_default_rules_name_every_leaf_once(config):
    names = leaves(init_params(config, jax.random.key(0)))
    compiled = sh._compile_rules(sh.DEFAULT_RULES)
    for name in names:
        assert sum(bool(regex.fullmatch(name)) for _, regex, _ in compiled) == 1, name
    mesh = sh.make_mesh("fsdp=1", jax.devices()[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        specs = sh.param_specs(layout.abstract_params(config), mesh)
    kinds = {p.path: p.kind for p in layout.rows(config)}
    flat = {path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]}
    for name, spec in flat.items():
        assert (spec != jax.sharding.PartitionSpec()) == (kinds[name] == layout.MATRIX), name


def test_default_rules_are_the_layout_matrices_then_vectors():
    assert sh.DEFAULT_RULES == (
        (r"tok_emb/embedding", sh.FSDP_MATRIX),
        (r"pos_emb/embedding", sh.FSDP_MATRIX),
        (r"blocks/\d+/attn/qkv/kernel", sh.FSDP_MATRIX),
        (r"blocks/\d+/attn/out/kernel", sh.FSDP_MATRIX),
        (r"blocks/\d+/ffn/fc/kernel", sh.FSDP_MATRIX),
        (r"blocks/\d+/ffn/proj/kernel", sh.FSDP_MATRIX),
        (r"out_head/kernel", sh.FSDP_MATRIX),
        (r"blocks/\d+/attn/q/kernel", sh.FSDP_MATRIX),
        (r"blocks/\d+/attn/k/kernel", sh.FSDP_MATRIX),
        (r"blocks/\d+/attn/v/kernel", sh.FSDP_MATRIX),
        (r"blocks/\d+/attn/o/kernel", sh.FSDP_MATRIX),
        (r"blocks/\d+/ffn/gate/kernel", sh.FSDP_MATRIX),
        (r"blocks/\d+/ffn/up/kernel", sh.FSDP_MATRIX),
        (r"blocks/\d+/ffn/down/kernel", sh.FSDP_MATRIX),
        (r".*/(bias|scale)", jax.sharding.PartitionSpec()),
    )
    assert sh.path_str is path_str


def test_a_leaf_the_table_does_not_name_is_an_error(monkeypatch):
    without = tuple(p for p in layout.PARAMS if p.path != "final_norm/bias")
    monkeypatch.setattr(layout, "PARAMS", without)
    with pytest.raises(AssertionError, match=r"not in the table \['final_norm/bias'\]"):
        param_shapes(BASE.replace(n_layers=1, emb_dim=8, n_heads=2))  # a config not cached yet
