"""Llama 3 and Qwen3 beside GPT-2: configs, presets, the Hugging Face key map,
and parity with `transformers` on tiny random float32 models (logits, loss,
every gradient, KV-cached greedy decoding, save_hf read back, bf16 compute).

The tiny models and the parity checks come from `jaxllm.parity.families`. The
Llama model has Llama 3's RoPE scaling with a short original context (16)
that decoding runs past; the Qwen3 model has head_dim * heads != hidden size,
grouped-query attention and a tied head. Norm scales are re-randomised so no
comparison passes on ones.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxllm import layout
from jaxllm.config import GPTConfig, count_params, get_preset
from jaxllm.generate import cache_bytes_per_token, empty_cache
from jaxllm.hf import config_from_hf, load_hf, to_hf_state_dict
from jaxllm.model import apply, init_params
from jaxllm.parity import assert_passed, families as family_parity
from jaxllm.parity.families import QWEN3, TOKENS, hf_model as _hf_model

TINY = GPTConfig(vocab_size=96, context_length=64, emb_dim=32, n_heads=4, n_layers=2,
                 ffn_dim=48, norm="rmsnorm", positions="rope", mlp="swiglu", out_bias=False,
                 mlp_bias=False, drop_rate=0.0, n_kv_heads=2)


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def pair(request):
    """(transformers model, jaxllm params, config) of one tiny random model."""
    return family_parity.pair(request.param)


# -- configs ---------------------------------------------------------------------
def test_presets_count_the_published_parameters():
    assert count_params(get_preset("qwen3-0.6b")) == 596_049_920
    assert count_params(get_preset("llama-3.2-1b")) == 1_235_814_400


def test_a_combination_that_cannot_work_is_refused_by_name():
    cases = [(dict(n_kv_heads=3), "n_heads .4. must be divisible by n_kv_heads .3."),
             (dict(head_size=7), "head_dim 7 is odd"),
             (dict(norm="batchnorm"), "GPTConfig.norm must be one of"),
             (dict(mlp="gelu"), "is not a model family"),
             (dict(attn_impl="mkl"), "attn_impl='mkl'.*grouped-query attention or RoPE"),
             (dict(norm_impl="rowwise"), "norm_impl='rowwise' runs LayerNorm only"),
             (dict(qkv_bias=True), "qkv_bias=True is not available in the Llama family")]
    for changes, message in cases:
        with pytest.raises(ValueError, match=message):
            TINY.replace(**changes)
    with pytest.raises(ValueError, match="n_kv_heads=2 is not available in the GPT-2 family"):
        GPTConfig(n_kv_heads=2, emb_dim=64, n_heads=4)


def test_architecture_names_the_family_fields_and_old_configs_keep_theirs():
    arch = get_preset("llama-3.2-1b").architecture()
    assert (arch["norm"], arch["positions"], arch["mlp"], arch["n_kv_heads"],
            arch["head_size"], arch["rope_scaling"], arch["rope_factor"]) == \
        ("rmsnorm", "rope", "swiglu", 8, 64, "llama3", 32.0)
    assert TINY.architecture() != TINY.replace(qk_norm=True).architecture()
    assert TINY.architecture() != TINY.replace(rope_theta=500.0).architecture()
    gpt2 = GPTConfig.from_dict({"vocab_size": 50257, "context_length": 1024, "emb_dim": 768,
                                "n_heads": 12, "n_layers": 12, "drop_rate": 0.1,
                                "qkv_bias": False})
    assert gpt2.family == "gpt2" and gpt2.head_dim == 64 and gpt2.kv_heads == 12


def test_kv_cache_holds_the_kv_heads_and_its_bytes_per_token():
    config = get_preset("llama-3.2-1b").replace(compute_dtype="bfloat16")
    assert cache_bytes_per_token(config) == 2 * 16 * 8 * 64 * 2 == 32 * 1024
    cache = jax.eval_shape(lambda: empty_cache(TINY, 3))
    assert cache.keys[0].shape == (3, 2, 8, 64) and cache.values[0].shape == (3, 2, 64, 8)


def test_grouped_query_attention_is_one_function_in_every_implementation():
    params = init_params(TINY, jax.random.key(0))
    ref = apply(params, TOKENS, TINY.replace(attn_impl="reference"))
    for impl in ("blockwise", "xla"):
        np.testing.assert_allclose(apply(params, TOKENS, TINY.replace(attn_impl=impl)), ref,
                                   rtol=1e-5, atol=1e-5, err_msg=impl)


# -- parity with transformers ------------------------------------------------------
# The checks are the parity module's (`jaxllm parity` reports the same figures).
@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_logits_loss_and_every_gradient_match_transformers(kind):
    logits, loss, grads = assert_passed(family_parity.logits_loss_gradients(kind))
    assert all(c.tolerance == c.rtol == 1e-5 for c in (logits, loss, grads))


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_kv_cached_greedy_decoding_matches_transformers_generate(kind):
    (tokens,) = assert_passed(family_parity.greedy_tokens(kind))  # past position 16
    assert tokens.tolerance == 0


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_save_hf_then_transformers_gives_the_same_logits(kind, tmp_path):
    logits, weights = assert_passed(family_parity.save_hf_round_trip(kind, tmp_path))
    assert logits.tolerance == logits.rtol == 1e-5 and weights.tolerance == 0


def test_bf16_compute_is_within_bf16_tolerance_of_float32(pair):
    _, params, config = pair
    full = apply(params, TOKENS, config)
    half = apply(params, TOKENS, config.replace(compute_dtype="bfloat16"))
    scale = float(jnp.abs(full).max())
    assert 0 < float(jnp.abs(half - full).max()) < 0.05 * scale


# -- loading folders -------------------------------------------------------------------
def _write(folder, hf_config: dict, tensors: dict):
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config, f)
    save_file(tensors, os.path.join(folder, "model.safetensors"))


def test_load_hf_reads_sharded_bf16_weights_and_the_older_config_form(tmp_path):
    model = _hf_model("llama")
    model.to(torch.bfloat16).save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    cfg = json.loads((tmp_path / "sharded" / "config.json").read_text())
    rope = cfg.pop("rope_parameters")  # as downloaded Llama 3.2 checkpoints write it
    cfg["rope_theta"] = rope.pop("rope_theta")
    cfg["rope_scaling"] = rope
    (tmp_path / "sharded" / "config.json").write_text(json.dumps(cfg))
    params, config = load_hf(tmp_path / "sharded")
    assert config.param_dtype == "bfloat16" and config.rope_scaling == "llama3"
    assert config.rope_original_context == 16 and config.rope_factor == 4.0
    want = {k: v.float().numpy() for k, v in model.state_dict().items()}
    got = to_hf_state_dict(params, config)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.parametrize("change, message", [
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}},
     "rope_type 'yarn' is not supported"),
    ({"use_sliding_window": True, "sliding_window": 8}, "sliding attention window"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"some_new_option": 3}, r"option\(s\) \['some_new_option'\]"),
    ({"architectures": ["MistralForCausalLM"]}, "not ones jaxllm loads"),
])
def test_an_option_the_loader_does_not_compute_is_refused_by_name(tmp_path, change, message):
    cfg = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", **QWEN3, **change}
    _write(tmp_path, cfg, {"x": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match=message):
        load_hf(tmp_path)


def test_load_hf_names_a_missing_or_misshapen_tensor(tmp_path):
    config = config_from_hf({"architectures": ["Qwen3ForCausalLM"], **QWEN3})
    sd = to_hf_state_dict(init_params(config, jax.random.key(0)), config)
    del sd["lm_head.weight"]  # tied: transformers omits it, and so may the file
    sd.pop("model.layers.1.self_attn.k_norm.weight")
    cfg = {"architectures": ["Qwen3ForCausalLM"], **QWEN3}
    _write(tmp_path, cfg, sd)
    with pytest.raises(ValueError, match=r"missing key\(s\).*model.layers.1.self_attn.k_norm"):
        load_hf(tmp_path)
    sd["model.layers.1.self_attn.k_norm.weight"] = np.ones(5, np.float32)
    _write(tmp_path, cfg, sd)
    with pytest.raises(ValueError, match=r"k_norm.weight: state dict has shape \(5,\)"):
        load_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_hf(tmp_path / "absent")


def test_layout_rows_carry_the_hugging_face_names(pair):
    model, _, config = pair
    names = {p.hf for p in layout.rows(config, every=True)}
    assert names == set(model.state_dict())


def test_a_checkpoint_saved_before_the_family_fields_resumes():
    """A run's saved model dict from before these fields existed lacks them; they take
    GPT-2's defaults, so the run is the same run."""
    from jaxllm.train.checkpoint import config_differences

    config = GPTConfig(vocab_size=100, context_length=16, emb_dim=32, n_heads=4, n_layers=2)
    old = {k: v for k, v in config.to_dict().items()
           if k in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers",
                    "drop_rate", "qkv_bias", "ffn_dim", "tie_embeddings", "ln_eps")}
    assert config_differences({"model": old}, {"model": config.to_dict()}) == []
    assert config_differences({"model": old}, {"model": config.replace(
        norm="rmsnorm", positions="rope", mlp="swiglu", out_bias=False, mlp_bias=False
    ).to_dict()}) != []
