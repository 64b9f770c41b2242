"""GPTConfig: the classic dict, validation, hashing, presets and parameter counts."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import pytest

from jaxllm.config import (
    GPT_CONFIG_124M,
    PRESETS,
    GPTConfig,
    count_params,
    get_preset,
    param_bytes,
    param_shapes,
)

CLASSIC_124M = {
    "vocab_size": 50257,
    "context_length": 1024,
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}


def closed_form_count(vocab, context, emb, layers, *, qkv_bias, tied, hidden=None):
    """Parameter count written out by hand, independently of `param_shapes`.

    Per block: two LayerNorms (4*emb), qkv (3*emb^2 [+ 3*emb]), attention
    output (emb^2 + emb), feed-forward (2*emb*hidden + hidden + emb).
    """
    hidden = 4 * emb if hidden is None else hidden
    block = 4 * emb + 3 * emb * emb + (3 * emb if qkv_bias else 0) + emb * emb + emb \
        + 2 * emb * hidden + hidden + emb
    head = 0 if tied else emb * vocab
    return vocab * emb + context * emb + layers * block + 2 * emb + head


# -- the classic dict --------------------------------------------------------
def test_classic_dict_equals_124m_config():
    config = GPTConfig.from_dict(CLASSIC_124M)
    assert config == GPT_CONFIG_124M
    for key, value in CLASSIC_124M.items():
        assert getattr(config, key) == value
    assert config.tie_embeddings is False
    assert config.hidden_dim == 4 * 768 and config.head_dim == 64


def test_dict_and_json_round_trip(tmp_path):
    config = GPT_CONFIG_124M.replace(n_layers=2, attn_impl="reference")
    assert GPTConfig.from_dict(config.to_dict()) == config
    path = tmp_path / "config.json"
    config.to_json(path)
    assert GPTConfig.from_json(path) == config


def test_replace_validates_and_rejects_unknown_fields():
    assert GPT_CONFIG_124M.replace(n_layers=3).n_layers == 3
    with pytest.raises(ValueError, match="n_heads"):
        GPT_CONFIG_124M.replace(n_heads=7)
    with pytest.raises(ValueError, match="n_layer"):
        GPT_CONFIG_124M.replace(n_layer=3)


# -- frozen and hashable -----------------------------------------------------
def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        GPT_CONFIG_124M.emb_dim = 10  # type: ignore[misc]


def test_hashable_and_equal_configs_hash_equal():
    a = GPTConfig.from_dict(CLASSIC_124M)
    b = GPTConfig()
    assert a is not b and hash(a) == hash(b)
    assert len({a, b, b.replace(n_layers=2)}) == 2


def test_usable_as_jit_static_argument():
    traces = []

    def width(x, config):
        traces.append(config)
        return x * config.emb_dim

    f = jax.jit(width, static_argnums=1)
    small = get_preset("small")
    assert float(f(jnp.float32(1.0), small)) == 128.0
    assert float(f(jnp.float32(2.0), GPTConfig.from_dict(small.to_dict()))) == 256.0
    assert len(traces) == 1  # an equal config hits the cache
    assert float(f(jnp.float32(1.0), small.replace(emb_dim=64))) == 64.0
    assert len(traces) == 2  # a different config retraces


# -- validation --------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("vocab_size", 0), ("vocab_size", -1), ("context_length", 0), ("emb_dim", 0),
        ("n_heads", 0), ("n_layers", -2), ("vocab_multiple", 0), ("ffn_dim", 0),
        ("vocab_size", True), ("n_layers", False), ("emb_dim", "768"), ("n_heads", "12"),
        ("context_length", 1024.0), ("ffn_dim", "3072"),
        ("drop_rate", 1.0), ("drop_rate", -0.1), ("drop_rate", float("nan")), ("drop_rate", "0.1"),
        ("drop_rate", True),
        ("qkv_bias", 1), ("qkv_bias", "False"), ("tie_embeddings", 0), ("scan_layers", None),
        ("ln_eps", 0.0), ("ln_eps", -1e-5), ("ln_eps", "1e-5"),
        ("attn_impl", "flash"), ("attn_impl", None), ("param_dtype", "float64"),
        ("compute_dtype", "fp16"), ("param_dtype", jnp.float32), ("remat", "everything"),
    ],
)
def test_invalid_field_raises_value_error_naming_it(field, value):
    with pytest.raises(ValueError, match=f"GPTConfig.{field}") as err:
        GPTConfig.from_dict({**CLASSIC_124M, field: value})
    assert repr(value) in str(err.value) or str(value) in str(err.value)


def test_emb_dim_must_divide_by_heads():
    with pytest.raises(ValueError, match=r"emb_dim \(768\).*n_heads \(10\)"):
        GPTConfig(n_heads=10)


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match="n_layer'"):
        GPTConfig.from_dict({**CLASSIC_124M, "n_layer": 12})
    with pytest.raises(ValueError, match="unknown GPTConfig field"):
        GPTConfig.from_dict({"emb_dim": 32, 7: "x"})  # keys of mixed types


def test_from_dict_rejects_non_mapping():
    with pytest.raises(ValueError, match="list"):
        GPTConfig.from_dict([("emb_dim", 32)])


def test_valid_edge_values_are_accepted():
    c = GPTConfig(drop_rate=0, ffn_dim=None, vocab_multiple=64, ln_eps=1)
    assert c.padded_vocab_size == 50304 and c.hidden_dim == 3072


# -- presets -----------------------------------------------------------------
@pytest.mark.parametrize(
    "name, emb, layers, heads",
    [("gpt2-124m", 768, 12, 12), ("gpt2-355m", 1024, 24, 16),
     ("gpt2-774m", 1280, 36, 20), ("gpt2-1558m", 1600, 48, 25)],
)
def test_gpt2_presets_shapes(name, emb, layers, heads):
    c = get_preset(name)
    assert (c.emb_dim, c.n_layers, c.n_heads) == (emb, layers, heads)
    assert (c.vocab_size, c.context_length, c.drop_rate, c.qkv_bias) == (50257, 1024, 0.1, False)
    assert c.head_dim == 64


def test_small_preset_is_tiny_byte_level():
    c = get_preset("small")
    assert c.vocab_size == 257 and c.tie_embeddings and c.drop_rate == 0.0
    assert count_params(c) < 1_000_000


def test_unknown_preset():
    with pytest.raises(ValueError, match="gpt2-7b"):
        get_preset("gpt2-7b")


# -- parameter counts and memory ---------------------------------------------
def test_count_params_124m_untied_and_tied():
    assert count_params(GPT_CONFIG_124M) == 163_009_536
    assert count_params(GPT_CONFIG_124M.replace(tie_embeddings=True)) == 124_412_160
    # The difference is exactly the output head, a second (emb, vocab) matrix.
    assert 163_009_536 - 124_412_160 == 768 * 50257


def test_param_bytes_124m_float32_and_bfloat16():
    assert round(param_bytes(GPT_CONFIG_124M) / 2**20, 2) == 621.83
    bf16 = GPT_CONFIG_124M.replace(param_dtype="bfloat16")
    assert param_bytes(bf16) * 2 == param_bytes(GPT_CONFIG_124M)


@pytest.mark.parametrize("name", sorted(n for n, c in PRESETS.items() if c.family == "gpt2"))
@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_count_params_matches_closed_form(name, qkv_bias, tied):
    c = PRESETS[name].replace(qkv_bias=qkv_bias, tie_embeddings=tied)
    expected = closed_form_count(c.vocab_size, c.context_length, c.emb_dim, c.n_layers,
                                 qkv_bias=qkv_bias, tied=tied)
    assert count_params(c) == expected


@pytest.mark.parametrize("name", sorted(n for n, c in PRESETS.items() if c.family == "llama"))
def test_llama_family_count_matches_closed_form(name):
    c = PRESETS[name]
    d, f, h, kv, hd = c.emb_dim, c.hidden_dim, c.n_heads, c.kv_heads, c.head_dim
    block = 2 * d * h * hd + 2 * d * kv * hd + 3 * d * f + 2 * d + (2 * hd if c.qk_norm else 0)
    head = 0 if c.tie_embeddings else c.vocab_size * d
    assert count_params(c) == c.vocab_size * d + c.n_layers * block + d + head


# Sizes of the released GPT-2 checkpoints (qkv bias on, output head tied to the
# token embedding), as reported by Hugging Face `num_parameters()`.
PUBLISHED_GPT2_SIZES = {
    "gpt2-124m": 124_439_808,
    "gpt2-355m": 354_823_168,
    "gpt2-774m": 774_030_080,
    "gpt2-1558m": 1_557_611_200,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_GPT2_SIZES))
def test_tied_with_qkv_bias_matches_published_gpt2_sizes(name):
    c = get_preset(name).replace(tie_embeddings=True, qkv_bias=True)
    assert count_params(c) == PUBLISHED_GPT2_SIZES[name]


def test_ffn_dim_and_vocab_padding_enter_the_count():
    c = GPTConfig(vocab_size=100, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                  ffn_dim=48, vocab_multiple=64)
    expected = closed_form_count(128, 16, 32, 2, qkv_bias=False, tied=False, hidden=48)
    assert count_params(c) == expected


def test_param_shapes_cover_the_model():
    c = get_preset("small").replace(n_layers=2, tie_embeddings=False)
    shapes = param_shapes(c)
    assert shapes["tok_emb/embedding"] == (257, 128)
    assert shapes["out_head/kernel"] == (128, 257)
    assert "blocks/1/ffn/proj/bias" in shapes and "blocks/2/ffn/proj/bias" not in shapes
    assert sum(math.prod(s) for s in shapes.values()) == count_params(c)


@pytest.mark.parametrize("tied", [False, True])
def test_param_shapes_agree_with_init_params(tied):
    from jaxllm.model import init_params

    c = GPTConfig(vocab_size=100, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                  qkv_bias=True, tie_embeddings=tied, vocab_multiple=64)
    abstract = jax.eval_shape(lambda key: init_params(c, key), jax.random.key(0))  # no allocation
    paths, _ = jax.tree_util.tree_flatten_with_path(abstract)
    actual = {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf.shape
              for path, leaf in paths}
    assert actual == param_shapes(c)


def test_component_breakdown_of_124m():
    from experiments.config import count_by_component

    parts = count_by_component(GPT_CONFIG_124M)
    assert parts["token embedding"] == parts["output head"] == 50257 * 768
    assert parts["position embedding"] == 1024 * 768
    assert parts["final norm"] == 2 * 768
    assert parts["transformer blocks"] == 12 * (12 * 768**2 + 10 * 768)
    assert sum(parts.values()) == count_params(GPT_CONFIG_124M)
    assert count_by_component(GPT_CONFIG_124M.replace(tie_embeddings=True))["output head"] == 0


def test_from_json_names_the_file_in_every_error(tmp_path):
    """The fine-tuning commands read --config with `from_json`; a bad file is
    named, and a sectioned pretrain config is told apart from a stray field."""
    p = tmp_path / "c.json"
    p.write_text('{"emb_dim": 64,}')
    with pytest.raises(ValueError, match=f"^config file {p} is not valid JSON: Expecting"):
        GPTConfig.from_json(p)
    p.write_text('{"model": {"emb_dim": 64}, "loop": {"save_every": 5}, "tokenizer": "byte"}')
    with pytest.raises(ValueError, match=f"^config file {p} is a sectioned `jaxllm pretrain` "
                                         r"config \(sections model, loop\); this --config takes "
                                         "the GPTConfig fields alone"):
        GPTConfig.from_json(p)
    p.write_text('{"n_layer": 2}')
    with pytest.raises(ValueError, match=rf"^config file {p}: unknown GPTConfig field\(s\)"):
        GPTConfig.from_json(p)
    with pytest.raises(FileNotFoundError, match=f"^config file {tmp_path / 'no.json'} does "
                                                "not exist$"):
        GPTConfig.from_json(tmp_path / "no.json")
