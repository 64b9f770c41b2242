"""Every speed lever computes the same function as the reference path.

The reference path is float32, `attn_impl="reference"`, layers unrolled, no
rematerialisation, no vocabulary padding, and the textbook cross-entropy.
Each lever is switched on alone on a tiny model and compared on the loss and
on every gradient; then the default (fast) configuration is trained for 20
steps next to the reference one.
"""

from __future__ import annotations

import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.attention import blockwise_attention, causal_attention, reference_attention
from jaxllm.config import GPTConfig
from jaxllm.kernels.recipe import cpu_recipe
from jaxllm.loss import cross_entropy, lm_loss, reference_cross_entropy
from jaxllm.model import apply, init_params
from jaxllm.train import TrainConfig, init_train_state, make_optimizer, make_train_step

TINY = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                 drop_rate=0.0)
REFERENCE = dict(attn_impl="reference", param_dtype="float32", compute_dtype="float32",
                 scan_layers=False, remat="none", vocab_multiple=1)


def reference_config(c: GPTConfig) -> GPTConfig:
    return c.replace(**REFERENCE)


def batch(c: GPTConfig, b: int = 3, seed: int = 1):
    data = np.random.default_rng(seed).integers(0, c.vocab_size, size=(b, c.context_length + 1))
    return jnp.asarray(data[:, :-1]), jnp.asarray(data[:, 1:])


def loss_and_grads(params, c: GPTConfig, ce=cross_entropy):
    x, y = batch(c)
    return jax.jit(jax.value_and_grad(lambda p: ce(apply(p, x, c), y)))(params)


def assert_trees_close(a, b, rtol, atol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(u, np.float32), np.asarray(v, np.float32),
                                   rtol=rtol, atol=atol)


def qkv(b=2, t=18, h=3, d=8, seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 3)
    return tuple(jax.random.normal(k, (b, t, h, d), dtype) for k in keys)


# -- attention ---------------------------------------------------------------------
def _attention_and_grads(fn, q, k, v):
    # A random cotangent, so every output element's gradient path is exercised.
    w = jax.random.normal(jax.random.key(9), q.shape, jnp.float32)
    def loss(*a):
        out = fn(*a)
        return jnp.sum(out.astype(jnp.float32) * w), out

    # One compilation gives the output and the three gradients.
    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


@pytest.mark.parametrize("impl", ["blockwise", "xla", "cudnn"])
def test_attention_impl_matches_reference(impl):
    if impl == "cudnn" and jax.default_backend() != "gpu":
        pytest.skip("cudnn attention needs a GPU")
    q, k, v = qkv(t=16, d=16)
    if impl == "cudnn":  # cuDNN's fused attention takes half precision only
        q, k, v = (a.astype(jnp.bfloat16) for a in (q, k, v))
    ref, ref_g = _attention_and_grads(reference_attention, q, k, v)
    out, g = _attention_and_grads(lambda *a: causal_attention(*a, impl), q, k, v)
    tol = 2e-2 if impl == "cudnn" else 1e-5
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert_trees_close((out, g), (ref, ref_g), rtol=tol, atol=tol)


@pytest.mark.parametrize("block_size", [4, 5, 64])
def test_blockwise_any_block_size_matches_reference(block_size):
    # 18 is not a multiple of 4 or 5: the last query block is shorter.
    q, k, v = qkv(t=18)
    ref, ref_g = _attention_and_grads(reference_attention, q, k, v)
    out, g = _attention_and_grads(lambda *a: blockwise_attention(*a, block_size=block_size),
                                  q, k, v)
    assert_trees_close((out, g), (ref, ref_g), rtol=1e-5, atol=1e-5)


def test_blockwise_is_causal():
    # Changing the last key/value must not change any earlier output position.
    q, k, v = qkv(t=12)
    attend = jax.jit(lambda *a: blockwise_attention(*a, block_size=4))
    out = attend(q, k, v)
    out2 = attend(q, k.at[:, -1].add(5.0), v.at[:, -1].add(5.0))
    np.testing.assert_array_equal(np.asarray(out[:, :-1]), np.asarray(out2[:, :-1]))
    assert not np.allclose(np.asarray(out[:, -1]), np.asarray(out2[:, -1]))


def test_blockwise_bfloat16_softmax_in_float32():
    q, k, v = qkv(t=16)
    ref = reference_attention(q, k, v)
    attend = jax.jit(lambda *a: blockwise_attention(*a, block_size=4))
    out = attend(*(a.astype(jnp.bfloat16) for a in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=3e-2)


def test_blockwise_rejects_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        blockwise_attention(*qkv(t=4), block_size=0)


# -- whole-model levers ---------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_run():
    c = reference_config(TINY)
    params = init_params(c, jax.random.key(0))
    return params, loss_and_grads(params, c, reference_cross_entropy)


@pytest.mark.parametrize("lever", [
    dict(attn_impl="blockwise"), dict(attn_impl="xla"), dict(scan_layers=True),
    dict(remat="full"), dict(remat="dots"), dict(remat="dots_no_batch"),
    dict(scan_layers=True, remat="dots", attn_impl="blockwise"),
    *(pytest.param(lever, marks=pytest.mark.skipif(
        platform.machine() != "x86_64", reason="Intel MKL is x86-64 only"))
      for lever in (dict(matmul_impl="mkl"), dict(attn_impl="mkl"), dict(norm_impl="mkl"),
                    dict(loss_impl="mkl"),
                    dict(matmul_impl="mkl", attn_impl="mkl", norm_impl="mkl", loss_impl="mkl"))),
])
def test_lever_matches_reference(lever, reference_run):
    params, (ref_loss, ref_grads) = reference_run
    c = reference_config(TINY).replace(**lever)
    loss, grads = loss_and_grads(params, c)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    assert_trees_close(grads, ref_grads, rtol=1e-4, atol=1e-6)


def test_cross_entropy_matches_textbook():
    logits = 30.0 * jax.random.normal(jax.random.key(0), (3, 5, 11))  # large: tests stability
    targets = jax.random.randint(jax.random.key(1), (3, 5), 0, 11)
    value, grad = jax.value_and_grad(cross_entropy)(logits, targets)
    ref_value, ref_grad = jax.value_and_grad(reference_cross_entropy)(logits, targets)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-5, atol=1e-7)
    # With a mask: only the selected positions count, in value and gradient.
    mask = jnp.arange(5)[None, :] < jnp.array([[2], [5], [0]])
    value_m, grad_m = jax.value_and_grad(cross_entropy)(logits, targets, mask)
    keep = np.asarray(mask)
    sel = np.asarray(logits)[keep][None], np.asarray(targets)[keep][None]
    np.testing.assert_allclose(float(value_m), float(reference_cross_entropy(*sel)), rtol=1e-6)
    assert np.all(np.asarray(grad_m)[~keep] == 0)


def test_cross_entropy_keeps_only_the_logits_for_backward():
    # What the backward pass keeps: the logits themselves and per-position
    # scalars, never a second (positions, vocab) array such as log-probabilities.
    b, t, v = 2, 3, 50
    logits = jax.random.normal(jax.random.key(0), (b, t, v))
    targets = jnp.zeros((b, t), jnp.int32)
    # The vjp closure is a pytree whose leaves are exactly the saved residuals.
    _, vjp = jax.vjp(lambda x: cross_entropy(x, targets), logits)
    saved = [a for a in jax.tree.leaves(vjp) if hasattr(a, "shape")]
    big = [a for a in saved if a.size >= b * t * v]
    assert len(big) == 1 and big[0].shape == logits.shape, [a.shape for a in saved]
    grad_jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: cross_entropy(x, targets)))(logits))
    assert "scatter" not in grad_jaxpr


@pytest.mark.parametrize("tied, multiple", [(False, 128), (True, 64)])
def test_padded_vocabulary_matches_unpadded(tied, multiple):
    c = reference_config(TINY).replace(tie_embeddings=tied)
    params = init_params(c, jax.random.key(0))
    ref_loss, ref_grads = loss_and_grads(params, c)

    cp = c.replace(vocab_multiple=multiple)
    assert cp.padded_vocab_size % multiple == 0 and cp.padded_vocab_size > c.vocab_size
    pad = cp.padded_vocab_size - c.vocab_size
    # Same real weights; the padding rows hold junk that must not matter.
    junk = jax.random.normal(jax.random.key(5), (pad, c.emb_dim))
    padded = dict(params, tok_emb={"embedding": jnp.concatenate(
        [params["tok_emb"]["embedding"], junk])})
    if not tied:
        padded["out_head"] = {"kernel": jnp.concatenate([params["out_head"]["kernel"], junk.T], 1)}
    loss, grads = loss_and_grads(padded, cp)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    v = c.vocab_size
    np.testing.assert_allclose(np.asarray(grads["tok_emb"]["embedding"][:v]),
                               np.asarray(ref_grads["tok_emb"]["embedding"]), rtol=1e-4, atol=1e-7)
    assert np.all(np.asarray(grads["tok_emb"]["embedding"][v:]) == 0)
    if not tied:
        np.testing.assert_allclose(np.asarray(grads["out_head"]["kernel"][:, :v]),
                                   np.asarray(ref_grads["out_head"]["kernel"]), rtol=1e-4, atol=1e-7)
        assert np.all(np.asarray(grads["out_head"]["kernel"][:, v:]) == 0)
    assert_trees_close(grads["blocks"], ref_grads["blocks"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_loss_keeps_one_logits_array_in_compute_dtype(compute_dtype):
    # The loss's backward pass keeps the head's logits once, as the product gave them:
    # no float32 copy of bf16 logits, no (batch, seq, vocab) mask from the padding.
    # 97 padded to 256: no other activation is as large as the logits
    c = reference_config(TINY).replace(vocab_multiple=256, compute_dtype=compute_dtype)
    params = init_params(c, jax.random.key(0))
    x, y = batch(c)
    loss, vjp = jax.vjp(lambda p: lm_loss(p, x, y, c), params)
    big = [a for a in jax.tree.leaves(vjp) if a.size >= x.size * c.padded_vocab_size]
    assert [(a.shape, a.dtype) for a in big] == [(x.shape + (c.padded_vocab_size,),
                                                  jnp.dtype(compute_dtype))]
    # The same loss as the textbook one on the float32 logits `apply` gives by default.
    logits = apply(params, x, c)[..., : c.vocab_size]
    np.testing.assert_allclose(float(loss), float(reference_cross_entropy(logits, y)), rtol=1e-6)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_precision_policy(param_dtype, reference_run):
    params32, (ref_loss, _) = reference_run
    c = reference_config(TINY).replace(param_dtype=param_dtype, compute_dtype="bfloat16",
                                       attn_impl="blockwise")
    params = jax.tree.map(lambda a: a.astype(param_dtype), params32)
    assert all(a.dtype == jnp.dtype(param_dtype) for a in jax.tree.leaves(init_params(c, jax.random.key(0))))
    x, y = batch(c)
    logits = apply(params, x, c)
    assert logits.dtype == jnp.float32  # the loss and its softmax are float32
    loss, grads = loss_and_grads(params, c)
    assert loss.dtype == jnp.float32
    # Gradients come back in the parameter (master) dtype.
    assert all(g.dtype == jnp.dtype(param_dtype) for g in jax.tree.leaves(grads))
    assert abs(float(loss) - float(ref_loss)) < 2e-2


# -- the accuracy goal: 20 training steps -----------------------------------
def _train_losses(c: GPTConfig, steps: int = 20, grad_accum: int = 1):
    tc = TrainConfig(lr=1e-3, warmup_steps=2, total_steps=steps, batch_size=4,
                     grad_accum=grad_accum)
    opt = make_optimizer(tc)
    state = init_train_state(init_params(c.replace(vocab_multiple=1, param_dtype="float32"),
                                         jax.random.key(0)), tc, opt)
    if c.padded_vocab_size != c.vocab_size:
        # Same real weights as the reference run, zero padding rows.
        pad = c.padded_vocab_size - c.vocab_size
        p = dict(state.params)
        p["tok_emb"] = {"embedding": jnp.pad(p["tok_emb"]["embedding"], ((0, pad), (0, 0)))}
        if "out_head" in p:
            p["out_head"] = {"kernel": jnp.pad(p["out_head"]["kernel"], ((0, 0), (0, pad)))}
        state = init_train_state(p, tc, opt)
    step = make_train_step(c, tc, opt)
    x, y = batch(c, b=4, seed=3)
    losses = []
    for _ in range(steps):
        state, m = step(state, {"tokens": x, "targets": y})
        losses.append(float(m["loss"]))
    return np.array(losses)


def test_fast_path_trains_like_reference():
    fast = TINY  # the GPTConfig defaults are the fast CPU path
    ref = _train_losses(reference_config(TINY))
    assert ref[-1] < ref[0] - 0.5  # it does learn
    np.testing.assert_allclose(_train_losses(fast), ref, rtol=0, atol=1e-4)
    bf16 = _train_losses(fast.replace(compute_dtype="bfloat16"))
    assert np.max(np.abs(bf16 - ref)) < 2e-2


@pytest.mark.skipif(platform.machine() != "x86_64", reason="Intel MKL is x86-64 only")
@pytest.mark.parametrize("vendor", ["GenuineIntel", "AuthenticAMD"])
def test_cpu_recipe_trains_like_reference(vendor):
    # The benchmark's CPU recipe for either vendor: dense layers by MKL on two
    # micro-batches, or by XLA on whole batches; the native attention, LayerNorm
    # and cross-entropy on both.
    ref = _train_losses(reference_config(TINY))
    recipe = cpu_recipe(vendor, "x86_64", native_kernels=True)
    accum = recipe.pop("grad_accum")
    np.testing.assert_allclose(_train_losses(TINY.replace(**recipe), grad_accum=accum), ref,
                               rtol=0, atol=1e-4)
