"""LoRA (jaxllm.lora): counts, parity with an independent PyTorch LoRA, merge,
every path (scan, bf16, MKL, KV-cached generation, sharded step), files, CLI."""

from __future__ import annotations

import json
import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn as nn

from jaxllm import GPT_CONFIG_124M, apply, from_hf_state_dict, generate, init_params
from jaxllm import lora
from jaxllm.finetune.classify import HEAD, add_class_head, classify_task, pool
from jaxllm.hf import save_safetensors
from jaxllm.parity import assert_passed, lora as lora_parity
from jaxllm.parity.lora import (ALPHA, CONFIG, RANK, class_batch, clf_logits,
                                every_layer_adapters, logits, lora_grads, random_adapters,
                                random_classifier, random_params, tokens)
from jaxllm.train import TrainConfig, init_train_state, make_train_step
from jaxllm.train.task import combine, count_trainable, lm_batch, partition, trainable_mask

# The tiny model, its adapters and the independent PyTorch LoRA are the parity
# checks' (`jaxllm parity` reports the same comparisons).


# -- counts -------------------------------------------------------------------
def test_parameter_counts_of_gpt2_124m_rank_16():
    c = GPT_CONFIG_124M
    shapes = jax.eval_shape(lambda k: init_params(c, k), jax.random.key(0))

    def count(params):
        return lora.count_lora_params(jax.eval_shape(
            lambda k: lora.init_lora(params, c, k, rank=16, allow_rank_above_dim=True),
            jax.random.key(0)))

    assert count(shapes) == 3_470_608  # with the LM head
    # the book's appendix E: every linear layer and the 768 x 2 class head (weights and bias)
    classifier = jax.eval_shape(lambda k: add_class_head(init_params(c, k), c, 2, k),
                                jax.random.key(0))
    assert count(classifier) == 2_666_528
    adapted = jax.eval_shape(lambda k: lora.with_adapters(classifier, lora.init_lora(
        classifier, c, k, rank=16, tied_head=False, allow_rank_above_dim=True), 16.0, "book"),
        jax.random.key(0))
    assert count_trainable(adapted, lora.TRAINABLE) == 2_666_528  # what trains, head included
    assert adapted[HEAD]["lora"]["b"].shape == (16, 2)
    fused = jax.eval_shape(lambda k: lora.init_lora(shapes, c, k, rank=16, qkv="fused",
                                                    targets="attn"), jax.random.key(0))
    assert fused["blocks/0/attn/qkv"]["a"].shape == (768, 16)
    assert fused["blocks/0/attn/qkv"]["b"].shape == (16, 2304)


@pytest.mark.parametrize("init,torch_shape", [("peft", (RANK, 128)),   # PEFT's lora_A.weight
                                              ("book", (128, RANK))])  # the book's A
def test_init_conventions_draw_a_as_their_sources_do(init, torch_shape):
    """A's bound is what torch's kaiming_uniform_(a=sqrt(5)) gives the source's
    tensor: U(+-1/sqrt(in)) for PEFT's (r, in) weight, U(+-1/sqrt(r)) for the
    book's (in, r) A; measured off torch's own draws."""
    adapters = lora.init_lora(random_params(), CONFIG, jax.random.key(0), rank=RANK,
                              targets="ffn", init=init)
    ours = np.abs(np.asarray(adapters["blocks/0/ffn/proj"]["a"]))  # (128, RANK)
    torch.manual_seed(0)
    theirs = torch.stack([nn.init.kaiming_uniform_(torch.empty(torch_shape), a=math.sqrt(5))
                          for _ in range(20)]).abs().max().item()
    assert 0.97 * theirs <= ours.max() <= 1.001 * theirs
    assert all(not np.any(ab["b"]) for ab in adapters.values())


def test_init_is_kaiming_uniform_and_b_is_zero():
    params = random_params()
    adapters = lora.init_lora(params, CONFIG, jax.random.key(0), rank=RANK)
    a = np.asarray(adapters["blocks/0/ffn/proj"]["a"])  # fan_in 128
    assert a.shape == (128, RANK) and np.abs(a).max() <= 1 / math.sqrt(128)
    assert np.abs(a).max() > 0.8 / math.sqrt(128)
    assert adapters["blocks/0/attn/qkv"]["a"].shape == (3, 32, RANK)
    assert all(not np.any(ab["b"]) for ab in adapters.values())


# -- against an independent PyTorch LoRA --------------------------------------
@pytest.mark.parametrize("qkv", ["split", "fused"])
def test_logits_loss_and_adapter_gradients_match_torch(qkv):
    # torch trains as many values as the adapters hold, and no torch gradient is zero
    logits_c, loss_c, grads_c = assert_passed(lora_parity.logits_and_gradients(qkv))
    assert (logits_c.tolerance, logits_c.rtol) == (1e-5, 1e-5)
    assert (loss_c.tolerance, loss_c.rtol) == (0, 1e-5)
    assert (grads_c.tolerance, grads_c.rtol) == (1e-5, 1e-4)


def test_five_adamw_steps_match_torch_and_frozen_weights_stay_bitwise():
    # frozen leaves keep no moments (the optimizer state holds the adapters' shapes
    # only), the loss falls, and the base weights stay bit for bit
    losses, base = assert_passed(lora_parity.adamw_steps())
    assert (losses.tolerance, losses.rtol) == (0, 1e-5) and base.tolerance == 0


# -- a classifier: the class head is a dense layer like the others -----------------
def test_class_head_adapter_moves_the_logits_and_gets_a_gradient():
    clf, batch = random_classifier(), class_batch()
    head = lora.init_lora(clf, CONFIG, jax.random.key(0), rank=RANK, targets=HEAD,
                          tied_head=False, allow_rank_above_dim=True)
    assert list(head) == [HEAD] and head[HEAD]["b"].shape == (RANK, 2)
    plain = np.asarray(clf_logits(clf, batch, CONFIG))
    np.testing.assert_allclose(np.asarray(clf_logits(lora.with_adapters(clf, head, ALPHA), batch,
                                                     CONFIG)), plain, atol=1e-6)  # B = 0
    ones = {HEAD: {"a": head[HEAD]["a"], "b": jnp.ones((RANK, 2))}}
    moved = lora.with_adapters(clf, ones, ALPHA)
    # the logits move by exactly the low-rank path on the pooled hidden state
    hidden = apply(clf, batch["tokens"], CONFIG, return_hidden=True)
    pooled = np.asarray(pool(hidden, batch), np.float64)
    want = (ALPHA / RANK) * pooled @ np.asarray(head[HEAD]["a"], np.float64) @ np.ones((RANK, 2))
    got = np.asarray(clf_logits(moved, batch, CONFIG)) - plain
    assert np.abs(want).max() > 0.1
    np.testing.assert_allclose(got, want, atol=1e-5)
    # and the head's adapter trains
    task = classify_task()
    train, frozen = partition(moved, trainable_mask(moved, lora.TRAINABLE))
    grads = jax.jit(jax.grad(lambda t: task(combine(t, frozen), batch, CONFIG)[0]))(train)
    g = lora.adapters_of(grads)[0][HEAD]
    assert np.abs(np.asarray(g["a"])).max() > 0 and np.abs(np.asarray(g["b"])).max() > 0


@pytest.mark.parametrize("scale", ["peft", "book"])
def test_merged_classifier_equals_the_adapted_one(scale):
    clf, batch = random_classifier(), class_batch()
    adapted = lora.with_adapters(clf, every_layer_adapters(clf), 2.0, scale)
    merged = lora.merge(adapted)
    assert lora.adapters_of(merged)[0] == {}
    assert not np.array_equal(np.asarray(merged[HEAD]["kernel"]), np.asarray(clf[HEAD]["kernel"]))
    want = np.asarray(clf_logits(adapted, batch, CONFIG))
    assert np.abs(want - np.asarray(clf_logits(clf, batch, CONFIG))).max() > 0.05
    np.testing.assert_allclose(np.asarray(clf_logits(merged, batch, CONFIG)), want, atol=1e-5)


def test_five_adamw_steps_of_a_classifier_adapted_everywhere_match_torch():
    # the book's appendix E in small (the parity check's docstring): every adapter
    # moved, as many values trained in torch as in jaxllm
    losses, adapters, logits_c, base = assert_passed(lora_parity.classifier_steps())
    assert all(c.tolerance == 1e-5 and c.rtol == 0 for c in (losses, adapters, logits_c))
    assert base.tolerance == 0


# -- the function ---------------------------------------------------------------
def test_zero_b_leaves_each_layer_bitwise_unchanged_and_the_model_too():
    from jaxllm.model import dense

    params = random_params()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 32)), jnp.float32)
    adapters = lora.init_lora(params, CONFIG, jax.random.key(3), rank=RANK)
    adapted = lora.with_adapters(params, adapters, ALPHA)
    for group, name, gelu in (("attn", "qkv", False), ("attn", "out", False), ("ffn", "fc", True)):
        np.testing.assert_array_equal(
            np.asarray(dense(adapted["blocks"][0][group][name], x, gelu=gelu)),
            np.asarray(dense(params["blocks"][0][group][name], x, gelu=gelu)))
    # Compiled whole, the two graphs may order XLA's products differently: equal to rounding.
    t = tokens()[:, :-1]
    np.testing.assert_allclose(np.asarray(logits(adapted, t, CONFIG)),
                               np.asarray(logits(params, t, CONFIG)), atol=1e-6)


@pytest.mark.parametrize("qkv", ["split", "fused"])
def test_merge_equals_the_adapter_forward_and_unmerge_inverts_it(qkv):
    params = random_params()
    adapters = random_adapters(params, qkv=qkv)
    adapted = lora.with_adapters(params, adapters, ALPHA)
    x = tokens()[:, :-1]
    merged = lora.merge(adapted)
    assert lora.adapters_of(merged)[0] == {}
    want = np.asarray(logits(adapted, x, CONFIG))
    assert np.abs(want - np.asarray(logits(params, x, CONFIG))).max() > 0.1  # adapters matter
    np.testing.assert_allclose(np.asarray(logits(merged, x, CONFIG)), want, atol=1e-5)
    again = lora.merge(params, adapters, ALPHA)
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(merged)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    back = lora.unmerge(merged, adapters, ALPHA)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def _paths():
    from jaxllm.kernels import mkl

    variants = [("scan_layers", {"scan_layers": True}, 1e-5),
                ("bfloat16", {"compute_dtype": "bfloat16"}, 0.1)]
    if mkl.available():  # x86-64 with MKL and a compiler (the CI machine)
        variants.append(("mkl", {"matmul_impl": "mkl", "attn_impl": "mkl"}, 1e-5))
    return variants


@pytest.mark.parametrize("name, changes, tol", _paths(), ids=[v[0] for v in _paths()])
def test_each_path_gives_the_reference_logits_and_gradients(name, changes, tol):
    params = random_params()
    adapted = lora.with_adapters(params, random_adapters(params), ALPHA)
    data = tokens()
    batch = lm_batch(jnp.asarray(data[:, :-1]), jnp.asarray(data[:, 1:]))
    config = CONFIG.replace(**changes)
    ref_loss, ref_grads = lora_grads(adapted, batch)
    loss, grads = lora_grads(adapted, batch, config)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=tol)
    ref, got = lora.adapters_of(ref_grads)[0], lora.adapters_of(grads)[0]
    for path in ref:
        for n in ("a", "b"):
            want = np.asarray(ref[path][n])
            err = np.abs(np.asarray(got[path][n], np.float32) - want).max()
            assert err <= tol * max(1.0, np.abs(want).max()), (path, n, err)


def test_kv_cached_generation_unmerged_equals_merged():
    params = random_params()
    adapted = lora.with_adapters(params, random_adapters(params), ALPHA)
    prompts = [[5, 6, 7], [9, 1]]
    a = generate(adapted, CONFIG, prompts, 6, return_logits=True)
    b = generate(lora.merge(adapted), CONFIG, prompts, 6, return_logits=True)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_allclose(np.asarray(a.logits), np.asarray(b.logits), atol=1e-4)
    first = np.asarray(logits(params, jnp.asarray([[5, 6, 7]]), CONFIG))[0, -1, :CONFIG.vocab_size]
    assert np.abs(np.asarray(a.logits)[0, 0] - first).max() > 0.1  # the adapters count


def test_sharded_step_with_lora_rules_equals_the_plain_step():
    from jaxllm import sharding

    params = random_params()
    adapted = lora.with_adapters(params, random_adapters(params), ALPHA)
    tc = TrainConfig(batch_size=2, total_steps=2, warmup_steps=0)
    mesh = sharding.make_mesh("fsdp=-1")
    rules = lora.sharding_rules()
    specs = sharding.param_specs(adapted, mesh, rules)
    assert specs["blocks"][0]["attn"]["qkv"]["lora"]["a"] == jax.sharding.PartitionSpec()
    data = tokens(shape=(2, 12))
    batch = lm_batch(jnp.asarray(data[:, :-1]), jnp.asarray(data[:, 1:]))
    state = init_train_state(adapted, tc, trainable=lora.TRAINABLE)
    abstract = jax.eval_shape(lambda: state)
    sharded = sharding.make_sharded_train_step(CONFIG, tc, mesh, rules, trainable=lora.TRAINABLE,
                                               state=abstract)
    loss, grads = lora_grads(adapted, batch)  # compiled already, for the parity test
    _, metrics = sharded(sharding.shard_train_state(state, mesh, rules), batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-6)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(grads)),
                               rtol=1e-5)


# -- the tied head ----------------------------------------------------------------
TIED = CONFIG.replace(tie_embeddings=True)


def test_tied_head_adapter_equals_the_untied_head_with_the_same_adapter():
    params = random_params(TIED)
    assert "out_head" not in params
    adapters = random_adapters(params, TIED, targets="head")
    assert {p: (ab["a"].shape, ab["b"].shape) for p, ab in adapters.items()} == \
        {"out_head": ((32, RANK), (RANK, 97))}  # as on an untied head: A (emb, r), B (r, vocab)
    adapted = lora.with_adapters(params, adapters, ALPHA)
    assert set(adapted["out_head"]) == {"lora"}  # no kernel: the head is still tok_emb
    untied_params, untied = lora.untie_head(params, TIED)
    reference = lora.with_adapters(untied_params, adapters, ALPHA)
    x, batch = tokens()[:, :-1], lm_batch(tokens()[:, :-1], tokens()[:, 1:])
    got = np.asarray(logits(adapted, x, TIED))
    np.testing.assert_allclose(got, np.asarray(logits(reference, x, untied)), atol=1e-5)
    (loss, grads), (want_loss, want_grads) = (lora_grads(adapted, batch, TIED),
                                             lora_grads(reference, batch, untied))
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    for n in ("a", "b"):
        np.testing.assert_allclose(np.asarray(grads["out_head"]["lora"][n]),
                                   np.asarray(want_grads["out_head"]["lora"][n]), atol=1e-5)
    assert np.abs(np.asarray(grads["out_head"]["lora"]["a"])).max() > 0
    # the trainable parameters: A and B of the head, nothing of the embedding
    assert count_trainable(adapted, lora.TRAINABLE) == RANK * (32 + 97)
    assert lora.count_lora_params(lora.init_lora(params, TIED, jax.random.key(0), rank=RANK)) \
        == lora.count_lora_params(lora.init_lora(params, TIED, jax.random.key(0), rank=RANK,
                                                 targets="attn,ffn")) + RANK * (32 + 97)
    blocks_only = lora.init_lora(params, TIED, jax.random.key(0), rank=RANK, tied_head=False)
    assert "out_head" not in blocks_only and len(blocks_only) == 8


def test_tied_head_with_zero_b_is_bitwise_the_plain_head():
    from jaxllm.model import lm_head

    params = random_params(TIED)
    adapted = lora.lora_params(params, TIED, jax.random.key(3), rank=RANK, alpha=ALPHA,
                               targets="head")
    h = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 32)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(lm_head(adapted, h, TIED)),
                                  np.asarray(lm_head(params, h, TIED)))
    t = tokens()[:, :-1]
    np.testing.assert_allclose(np.asarray(logits(adapted, t, TIED)),
                               np.asarray(logits(params, t, TIED)), atol=1e-6)
    stripped = lora.strip_adapters(adapted)
    assert jax.tree.structure(stripped) == jax.tree.structure(params)


def test_merging_a_tied_head_adapter_unties_the_head_and_keeps_the_embedding():
    params = random_params(TIED)
    adapters = random_adapters(params, TIED)  # every layer, the head too
    adapted = lora.with_adapters(params, adapters, ALPHA)
    with pytest.raises(ValueError, match="tied to the token embedding.*merge_model"):
        lora.merge(adapted)
    merged, config = lora.merge_model(adapted, TIED)
    assert not config.tie_embeddings and set(merged["out_head"]) == {"kernel"}
    assert merged["tok_emb"]["embedding"] is params["tok_emb"]["embedding"]  # the input side
    assert not lora.adapters_of(merged)[0]
    x = tokens()[:, :-1]
    want = np.asarray(logits(adapted, x, TIED))
    np.testing.assert_allclose(np.asarray(logits(merged, x, config)), want, atol=1e-5)
    # with separate adapters, the same; unmerge leaves the untied base
    again, config2 = lora.merge_model(params, TIED, adapters, ALPHA)
    assert config2 == config
    np.testing.assert_allclose(np.asarray(logits(again, x, config)), want, atol=1e-5)
    back = lora.unmerge(merged, adapters, ALPHA)
    np.testing.assert_allclose(np.asarray(back["out_head"]["kernel"]),
                               np.asarray(params["tok_emb"]["embedding"]).T, atol=1e-6)
    # without a head adapter a tied model stays tied
    blocks = {p: ab for p, ab in adapters.items() if p != "out_head"}
    kept, same = lora.merge_model(lora.with_adapters(params, blocks, ALPHA), TIED)
    assert same.tie_embeddings and "out_head" not in kept


def test_tied_head_adapter_file_round_trip(tmp_path):
    params = random_params(TIED)
    adapters = random_adapters(params, TIED, targets="head,attn")
    lora.save_adapters(tmp_path / "a.safetensors", adapters, ALPHA, TIED)
    loaded = lora.load_adapters(tmp_path / "a.safetensors", params, TIED)
    x = tokens()[:, :-1]
    np.testing.assert_allclose(np.asarray(logits(loaded, x, TIED)), np.asarray(logits(
        lora.with_adapters(params, adapters, ALPHA), x, TIED)), atol=1e-6)


# -- files ----------------------------------------------------------------------
def test_adapter_file_round_trip_and_another_base_is_refused(tmp_path):
    params = random_params()
    adapters = random_adapters(params)
    path = tmp_path / "adapters.safetensors"
    lora.save_adapters(path, adapters, ALPHA, CONFIG)
    adapted = lora.load_adapters(path, params, CONFIG)
    want = lora.with_adapters(params, adapters, ALPHA)
    for a, b in zip(jax.tree.leaves(adapted), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert path.stat().st_size < 4 * lora.count_lora_params(adapters) + 4096

    other = CONFIG.replace(emb_dim=48, n_heads=4)
    with pytest.raises(ValueError, match=r"another base model:[\s\S]*emb_dim: adapters 32, "
                                         r"base 48[\s\S]*blocks/0/attn/qkv: kernel \(32, 96\)"):
        lora.load_adapters(path, random_params(other), other)
    fewer = CONFIG.replace(n_layers=1)
    with pytest.raises(ValueError, match="blocks/1/attn/qkv: in the adapters, not a dense layer"):
        lora.load_adapters(path, random_params(fewer), fewer)
    save_safetensors(params, CONFIG, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="not a jaxllm adapter file"):
        lora.read_adapters(tmp_path / "model.safetensors")


@pytest.mark.parametrize("scale,want_scale", [("book", ALPHA), (0.5, 0.5), ("peft", ALPHA / RANK)])
def test_adapter_files_record_the_conventions_and_reload_with_their_scale(tmp_path, scale,
                                                                        want_scale):
    params = random_params()
    adapters = random_adapters(params)
    path = tmp_path / "adapters.safetensors"
    lora.save_adapters(path, adapters, ALPHA, CONFIG, scale=scale, init="book")
    _, alpha, meta = lora.read_adapters(path)
    assert (alpha, meta["scale"], meta["init"]) == (ALPHA, scale, "book")
    assert set(meta["scales"].values()) == {want_scale}
    adapted = lora.load_adapters(path, params, CONFIG)
    assert set(lora.adapters_of(adapted)[1].values()) == {want_scale}
    x = tokens()[:, :-1]
    np.testing.assert_allclose(np.asarray(logits(adapted, x, CONFIG)), np.asarray(logits(
        lora.with_adapters(params, adapters, ALPHA, scale), x, CONFIG)), atol=1e-6)
    # merge and unmerge of separate adapters follow the same convention
    merged = lora.merge(params, adapters, ALPHA, scale=scale)
    np.testing.assert_allclose(np.asarray(logits(merged, x, CONFIG)),
                               np.asarray(logits(adapted, x, CONFIG)), atol=2e-5)
    back = lora.unmerge(merged, adapters, ALPHA, scale=scale)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_an_adapter_file_without_conventions_reads_as_peft(tmp_path):
    """Files written before the conventions were recorded: alpha / rank."""
    from safetensors.numpy import save_file

    params = random_params()
    adapters = random_adapters(params, targets="ffn")
    path = tmp_path / "old.safetensors"
    lora.save_adapters(path, adapters, ALPHA, CONFIG)
    _, _, meta = lora.read_adapters(path)
    tensors = {f"{p}/{n}": np.asarray(x, np.float32) for p, ab in adapters.items()
               for n, x in ab.items()}
    save_file(tensors, str(path), metadata={
        "format": lora.FILE_FORMAT, "alpha": repr(ALPHA), "base": json.dumps(meta["base"]),
        "kernels": json.dumps(meta["kernels"]), "info": "{}"})
    _, _, old = lora.read_adapters(path)
    assert (old["scale"], old["init"]) == ("peft", None)
    assert set(lora.adapters_of(lora.load_adapters(path, params, CONFIG))[1].values()) == \
        {ALPHA / RANK}
    with pytest.raises(ValueError, match=r"LoRA scale must be one of \['book', 'peft'\] or a "
                                         r"number > 0, got 'paper'"):
        lora.with_adapters(params, adapters, ALPHA, "paper")
    with pytest.raises(ValueError, match="an explicit LoRA scale must be a finite number > 0"):
        lora.with_adapters(params, adapters, None, -1.0)


def test_merged_model_exports_to_hugging_face_and_loads_back(tmp_path):
    params = random_params()
    adapted = lora.with_adapters(params, random_adapters(params), ALPHA)
    save_safetensors(lora.merge(adapted), CONFIG, tmp_path / "model.safetensors")
    loaded = from_hf_state_dict(tmp_path / "model.safetensors", CONFIG)
    x = tokens()[:, :-1]
    np.testing.assert_allclose(np.asarray(logits(loaded, x, CONFIG)),
                               np.asarray(logits(adapted, x, CONFIG)), atol=1e-5)


# -- bad input ------------------------------------------------------------------
def test_bad_input_is_named():
    params = random_params()
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=re.escape(r"targets 'blocks/\d+/attn/nothing' match no "
                                                   "dense layer; dense layers: blocks/0/attn/out")):
        lora.init_lora(params, CONFIG, key, rank=2, targets=r"blocks/\d+/attn/nothing")
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        lora.init_lora(params, CONFIG, key, rank=0)
    # a rank above a layer's size is a warning (the book puts rank 16 on a 2-class head)
    with pytest.warns(UserWarning, match=r"rank 33 exceeds the smaller dimension of "
                                         r"blocks/0/attn/qkv \(32 x 32 per q/k/v slice\)"):
        wide = lora.init_lora(params, CONFIG, key, rank=33, targets=r".*/qkv")
    assert wide["blocks/0/attn/qkv"]["a"].shape == (3, 32, 33)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lora.init_lora(params, CONFIG, key, rank=33, targets=r".*/qkv", allow_rank_above_dim=True)
    with pytest.raises(ValueError, match=r"LoRA init must be one of \['book', 'peft'\]"):
        lora.init_lora(params, CONFIG, key, rank=2, init="kaiming")
    with pytest.raises(ValueError, match="qkv must be one of"):
        lora.init_lora(params, CONFIG, key, rank=2, qkv="separate")
    tied = CONFIG.replace(tie_embeddings=True)
    with pytest.raises(ValueError, match="LM head is not part of this model"):
        lora.init_lora(random_params(tied), tied, key, rank=2, targets="head", tied_head=False)
    untied_params, untied = lora.untie_head(random_params(tied), tied)
    assert "out_head" in lora.init_lora(untied_params, untied, key, rank=2, targets="head")
    with pytest.raises(ValueError, match="scan_layers stacks the blocks"):
        lora.init_lora(params, CONFIG.replace(scan_layers=True), key, rank=2,
                       targets=r"blocks/0/attn/qkv")
    adapters = lora.init_lora(params, CONFIG, key, rank=2, targets="ffn")
    with pytest.raises(ValueError, match=r"does not fit the kernel \(128, 32\)"):
        bad = {"blocks/0/ffn/proj": adapters["blocks/0/ffn/fc"]}
        lora.with_adapters(params, bad, 2.0)


def test_alpha_must_be_a_positive_number():
    params = random_params()
    adapters = random_adapters(params)
    for alpha in (0.0, -3.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="LoRA alpha must be a finite number > 0"):
            lora.with_adapters(params, adapters, alpha)


def test_the_scale_never_trains_whatever_the_trainable_choice():
    params = lora.with_adapters(random_params(), random_adapters(random_params()), ALPHA)
    for trainable in (None, r"blocks/1/.*", lora.trainable(r"blocks/1/.*"),
                      lambda path, leaf: True):
        mask = {path: m for path, m in _paths(trainable_mask(params, trainable)).items()}
        scales = [path for path in mask if path.endswith("lora/scale")]
        assert scales and not any(mask[path] for path in scales), trainable
        assert any(mask[path] for path in mask if path.endswith("lora/b"))
    tc = TrainConfig(lr=1e-2, total_steps=3, batch_size=2, weight_decay=0.1)
    spec = lora.trainable(r"blocks/1/.*")
    state = init_train_state(jax.tree.map(jnp.copy, params), tc, trainable=spec)
    state, _ = make_train_step(CONFIG, tc, trainable=spec)(state, lm_batch(*_xy()))
    assert set(lora.adapters_of(state.params)[1].values()) == {ALPHA / RANK}


def _paths(tree):
    from jaxllm.train.task import path_str

    return {path_str(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _xy():
    t = tokens()
    return t[:2, :-1], t[:2, 1:]


def test_damaged_adapter_files_and_compatible_bases(tmp_path):
    params = random_params()
    path = tmp_path / "adapters.safetensors"
    lora.save_adapters(path, random_adapters(params, targets="attn,ffn"), ALPHA, CONFIG)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"adapter file {cut} is damaged or not a safetensors"):
        lora.load_adapters(cut, params, CONFIG)
    with pytest.raises(ValueError, match=f"adapter file {tmp_path} is a folder"):
        lora.load_adapters(tmp_path, params, CONFIG)
    # a base that differs where no adapted kernel depends on it takes the adapters
    for other in (CONFIG.replace(context_length=16), CONFIG.replace(vocab_multiple=64),
                  CONFIG.replace(tie_embeddings=True)):
        adapted = lora.load_adapters(path, random_params(other), other)
        assert len(lora.adapters_of(adapted)[0]) == 8


# -- the command line -----------------------------------------------------------
def test_pretrain_lora_flags_then_merge_and_export(tmp_path, capsys):
    """The flags give the run's initial weights with adapters; `jaxllm lora` merges
    and exports a checkpoint of them. (The training loop itself takes `params=`
    and `trainable=` and is tested with them in the engine's tests.)"""
    import argparse

    from jaxllm.cli import main, pretrain
    from jaxllm.train import checkpoint

    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    tiny = ["--set", "context_length=16", "--set", "emb_dim=16", "--set", "n_heads=2",
            "--set", "n_layers=1", "--set", "tie_embeddings=false"]
    args = parser.parse_args([*tiny, "--lora-rank", "2", "--lora-alpha", "4",
                              "--lora-targets", "attn,head"])
    config, tc, _, _ = pretrain.build_configs(args)
    params, trainable, record = pretrain._lora_start(args, config, tc)
    assert trainable == lora.TRAINABLE
    assert record == {"rank": 2, "alpha": 4.0, "scale": "peft", "init": "peft",
                      "targets": "attn,head", "qkv": "split", "layers": 3, "parameters": 802}
    assert "LoRA: 3 adapted dense layers, 802 trainable parameters" in capsys.readouterr().err
    adapters, scales = lora.adapters_of(params)
    assert sorted(adapters) == ["blocks/0/attn/out", "blocks/0/attn/qkv", "out_head"]
    assert set(scales.values()) == {2.0}
    assert count_trainable(params, lora.trainable(r"out_head/kernel")) == 802 + 16 * 257
    plain = pretrain.build_configs(parser.parse_args(tiny))
    assert pretrain._lora_start(parser.parse_args(tiny), plain[0], plain[1]) == (None, None, None)
    with pytest.raises(ValueError, match="--lora-alpha needs --lora-rank"):
        pretrain._lora_start(parser.parse_args([*tiny, "--lora-alpha", "4"]), config, tc)

    # a checkpoint as a LoRA run leaves it, with trained (non-zero) B
    trained = lora.with_adapters(lora.strip_adapters(params), random_adapters(
        params, config, targets="attn,head"), 4.0)
    run = tmp_path / "run"
    checkpoint.save(checkpoint.open_manager(run, create=True),
                    init_train_state(trained, tc, trainable=trainable),
                    {"model": config.to_dict(), "tokenizer": "byte"})
    x = np.array([[1, 2, 3, 4]], np.int32)
    want = np.asarray(logits(trained, x, config))
    assert main(["lora", "merge", "--run-dir", str(run), "--out", str(tmp_path / "hf")]) == 0
    merged = from_hf_state_dict(tmp_path / "hf" / "model.safetensors", config)
    np.testing.assert_allclose(np.asarray(logits(merged, x, config)), want, atol=1e-5)
    out = tmp_path / "adapters.safetensors"
    assert main(["lora", "export", "--run-dir", str(run), "--out", str(out)]) == 0
    reloaded = lora.load_adapters(out, lora.strip_adapters(params), config)
    np.testing.assert_allclose(np.asarray(logits(reloaded, x, config)), want, atol=1e-6)
    assert main(["lora", "merge", "--run-dir", str(tmp_path / "hf"), "--out", "x"]) == 2
    assert "no checkpoints" in capsys.readouterr().err


def test_a_rule_of_the_users_shards_an_adapter_before_the_replicate_rule():
    import warnings

    from jax.sharding import PartitionSpec as P

    from jaxllm import sharding

    params = lora.with_adapters(random_params(), random_adapters(random_params()), ALPHA)
    rules = lora.sharding_rules([(r"(.+/)?ffn/fc/lora/a", P(None, "fsdp")),
                                 *sharding.DEFAULT_RULES])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every adapter leaf is named by a rule: no warning
        specs = _paths(sharding.param_specs(params, sharding.make_mesh("data=1"), rules))
    assert specs["blocks/0/ffn/fc/lora/a"] == P(None, "fsdp")
    assert specs["blocks/0/ffn/fc/lora/b"] == P() and specs["blocks/1/attn/qkv/lora/a"] == P()
