"""The MKL kernels against NumPy and XLA: the matrix product (`GPTConfig.matmul_impl="mkl"`),
causal attention (`GPTConfig.attn_impl="mkl"`), LayerNorm (`GPTConfig.norm_impl="rowwise"`),
the cross-entropy (`GPTConfig.loss_impl="rowwise"`) and the column sum of the bias gradients.

MKL ships for x86-64 only; there the test extra installs it, so these run
(never skip) in CI.
"""

from __future__ import annotations

import platform
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.attention import causal_attention, reference_attention
from jaxllm.config import GPTConfig
from jaxllm.generate import generate
from jaxllm.kernels import mkl
from jaxllm.loss import cross_entropy, lm_loss
from jaxllm.model import apply, init_params, layer_norm
from jaxllm.sharding import _check_native_kernels

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="Intel MKL is x86-64 only")


def operands(m, k, n, trans_a, trans_b, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.normal(size=(n, k) if trans_b else (k, n)).astype(np.float32)
    want = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b).astype(np.float64)
    return a, b, want


# (m, k, n): odd sizes; one row; products large enough to be split over the
# pool's threads by rows (m >= n) and by columns (n > m).
SHAPES = [(3, 5, 7), (1, 64, 1), (257, 130, 64), (96, 200, 320)]


@pytest.mark.parametrize("m, k, n", SHAPES)
@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True),
                                              (True, True)])
def test_sgemm_matches_numpy(m, k, n, trans_a, trans_b):
    a, b, want = operands(m, k, n, trans_a, trans_b)
    got = jax.jit(lambda a, b: mkl.sgemm(a, b, trans_a=trans_a, trans_b=trans_b))(a, b)
    assert got.shape == (m, n) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-4)


def test_large_products_are_split_and_still_exact():
    # 512 x 256 x 512 is 64M multiply-adds: cut into one panel per pool thread.
    a, b, want = operands(512, 256, 512, True, False, seed=3)
    got = np.asarray(jax.jit(lambda a, b: mkl.sgemm(a, b, trans_a=True))(a, b))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)


def test_empty_product_is_zeros():
    got = mkl.sgemm(jnp.ones((4, 0)), jnp.ones((0, 3)))
    np.testing.assert_array_equal(np.asarray(got), np.zeros((4, 3), np.float32))


@pytest.mark.parametrize("transpose_w", [False, True])
def test_matmul_gradients_match_xla(transpose_w):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(37, 24)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(19, 24) if transpose_w else (24, 19)), jnp.float32)
    cot = jnp.asarray(rng.normal(size=(37, 19)), jnp.float32)

    out, vjp = jax.vjp(lambda x, w: mkl.matmul(x, w, transpose_w), x, w)
    ref, ref_vjp = jax.vjp(lambda x, w: x @ (w.T if transpose_w else w), x, w)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    for g, r in zip(vjp(cot), ref_vjp(cot)):
        assert g.shape == r.shape
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-4)


def test_sgemm_rejects_bad_operands():
    with pytest.raises(ValueError, match="2-D"):
        mkl.sgemm(jnp.ones((2, 3, 4)), jnp.ones((4, 5)))
    with pytest.raises(ValueError, match="float32"):
        mkl.sgemm(jnp.ones((2, 3), jnp.bfloat16), jnp.ones((3, 4), jnp.bfloat16))
    with pytest.raises(ValueError, match="contracting"):
        mkl.sgemm(jnp.ones((2, 3)), jnp.ones((4, 5)))


def test_tied_head_model_matches_xla():
    c = GPTConfig(vocab_size=61, context_length=8, emb_dim=16, n_heads=2, n_layers=1,
                  drop_rate=0.0, tie_embeddings=True, qkv_bias=True)
    params = init_params(c, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 8), 0, c.vocab_size)

    def loss_grads(cfg):
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(apply(p, tokens, cfg) ** 2)))(params)

    (ref, ref_g), (got, got_g) = loss_grads(c), loss_grads(c.replace(matmul_impl="mkl"))
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
    for g, r in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)


def test_build_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_CACHE_DIR", str(tmp_path))
    libs = mkl.mkl_libraries()
    first = mkl.build(libs)
    assert first.parent.parent == tmp_path and first.exists()
    stamp = first.stat().st_mtime_ns
    assert mkl.build(libs) == first and first.stat().st_mtime_ns == stamp
    assert not list(first.parent.glob("*.tmp"))  # the build wrote atomically


def test_missing_mkl_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_MKL_LIB_DIR", str(tmp_path))
    with pytest.raises(mkl.MKLUnavailable, match=r"libmkl_core.so.*pip install 'jaxllm\[mkl\]'"):
        mkl.mkl_libraries()


def test_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(mkl.MKLUnavailable, match="no-such-compiler"):
        mkl.build(mkl.mkl_libraries())


def test_config_and_mesh_checks():
    with pytest.raises(ValueError, match="matmul_impl"):
        GPTConfig(matmul_impl="blas")
    with pytest.raises(ValueError, match="computes in float32"):
        GPTConfig(matmul_impl="mkl", compute_dtype="bfloat16")
    with pytest.raises(ValueError, match="attn_impl='mkl' computes in float32"):
        GPTConfig(attn_impl="mkl", compute_dtype="bfloat16")
    with pytest.raises(ValueError, match="norm_impl='rowwise' computes in float32"):
        GPTConfig(norm_impl="mkl", compute_dtype="bfloat16")
    with pytest.raises(ValueError, match="norm_impl must be one of"):
        GPTConfig(norm_impl="fused")
    with pytest.raises(ValueError, match="loss_impl='rowwise' computes in float32"):
        GPTConfig(loss_impl="mkl", compute_dtype="bfloat16")
    with pytest.raises(ValueError, match="loss_impl must be one of"):
        GPTConfig(loss_impl="chunked")
    for field in ("matmul_impl", "attn_impl", "norm_impl", "loss_impl"):
        _check_native_kernels(GPTConfig(**{field: "mkl"}), types.SimpleNamespace(size=1))
        with pytest.raises(ValueError, match=f"{field}='(mkl|rowwise)' runs on one CPU device"):
            _check_native_kernels(GPTConfig(**{field: "mkl"}), types.SimpleNamespace(size=2))


def test_cached_generation_matches_xla():
    c = GPTConfig(vocab_size=50, context_length=12, emb_dim=16, n_heads=2, n_layers=2,
                  drop_rate=0.0)
    params = init_params(c, jax.random.key(0))
    prompts = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    ref = generate(params, c, prompts, 10, return_logits=True)  # slides past the context
    got = generate(params, c.replace(matmul_impl="mkl"), prompts, 10, return_logits=True)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(ref.logits), rtol=1e-4, atol=1e-5)


# -- attention -----------------------------------------------------------------
def numpy_attention(q, k, v):
    """Causal softmax attention in float64, (batch, seq, heads, head_dim)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    t = q.shape[1]
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def qkv_operands(b, t, h, d, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(b, t, h, d)).astype(np.float32)) for _ in range(3))


# (batch, seq, heads, head_dim): one query block (seq < 128), exactly one and two
# blocks, a ragged last block, a single position, and large scores (scaled q).
ATTENTION_SHAPES = [(2, 16, 2, 8), (1, 128, 4, 16), (2, 256, 4, 64), (3, 130, 2, 16),
                    (2, 1, 3, 8), (1, 300, 1, 32)]


@pytest.mark.parametrize("b, t, h, d", ATTENTION_SHAPES)
def test_attention_matches_numpy(b, t, h, d):
    q, k, v = qkv_operands(b, t, h, d)
    got = jax.jit(causal_attention, static_argnums=3)(q, k, v, "mkl")
    assert got.shape == (b, t, h, d) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), numpy_attention(q, k, v), rtol=1e-5, atol=1e-5)


def test_attention_with_large_scores_is_stable():
    q, k, v = qkv_operands(2, 140, 2, 16, seed=1)
    q = q * 30.0  # scores in the hundreds: the softmax must subtract its row maximum
    got = np.asarray(causal_attention(q, k, v, "mkl"))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, numpy_attention(q, k, v), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("b, t, h, d", [(2, 16, 2, 8), (2, 256, 4, 64), (3, 130, 2, 16),
                                        (2, 1, 3, 8)])
def test_attention_gradients_match_xla(b, t, h, d):
    q, k, v = qkv_operands(b, t, h, d, seed=2)
    w = jnp.asarray(np.random.default_rng(3).normal(size=(b, t, h, d)).astype(np.float32))

    def loss(impl):
        return lambda q, k, v: jnp.sum(w * jnp.tanh(causal_attention(q, k, v, impl)))

    want = jax.grad(lambda q, k, v: jnp.sum(w * jnp.tanh(reference_attention(q, k, v))),
                    argnums=(0, 1, 2))(q, k, v)
    got = jax.jit(jax.grad(loss("mkl"), argnums=(0, 1, 2)))(q, k, v)
    for name, g, r in zip("qkv", got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5,
                                   err_msg=f"d{name}")


@pytest.mark.parametrize("save_probs", [True, False])
@pytest.mark.parametrize("block", [1, 7, 64, 128])
@pytest.mark.parametrize("b, t, h, d", [(2, 130, 2, 16), (1, 64, 3, 8)])
def test_attention_block_and_saved_probabilities_keep_the_gradient(b, t, h, d, block, save_probs):
    # Every block size (ragged last blocks included), with the probabilities
    # saved by the forward or recomputed by the backward, against XLA's gradient
    # of the textbook attention.
    q, k, v = qkv_operands(b, t, h, d, seed=6)
    qkv = jnp.concatenate([x.reshape(b, t, h * d) for x in (q, k, v)], axis=-1)
    w = jnp.asarray(np.random.default_rng(7).normal(size=(b, t, h * d)).astype(np.float32))

    def ref(x):
        out = reference_attention(*(x[..., i * h * d:(i + 1) * h * d].reshape(b, t, h, d)
                                    for i in range(3)))
        return jnp.sum(w * jnp.tanh(out.reshape(b, t, h * d)))

    got_val, got = jax.jit(jax.value_and_grad(
        lambda x: jnp.sum(w * jnp.tanh(mkl.attention(x, h, save_probs, block)))))(qkv)
    want_val, want = jax.value_and_grad(ref)(qkv)
    np.testing.assert_allclose(float(got_val), float(want_val), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("seq, block", [(1, 64), (64, 64), (130, 64), (256, 64), (300, 128),
                                        (10, 3)])
def test_attention_probs_per_pair_counts_each_block_rows_times_keys(seq, block):
    want = sum(min(block, seq - lo) * min(lo + block, seq) for lo in range(0, seq, block))
    assert mkl.attention_probs_per_pair(seq, block) == want


def test_attention_saves_probabilities_only_where_they_are_small():
    # No more than the feed-forward's hidden activation, 4 * emb floats a position.
    assert mkl.attention_saves_probs(256, 256, 4)  # the CPU config
    assert mkl.attention_saves_probs(128, 128, 4)  # the small preset
    assert not mkl.attention_saves_probs(1024, 768, 12)  # GPT-2 124M at full context
    assert mkl.attention_saves_probs(448, 768, 12)  # 12 * 114688 floats, exactly 4 * 768 * 448
    assert not mkl.attention_saves_probs(449, 768, 12)


def test_packed_attention_reads_the_qkv_layout():
    # The kernel's input is the qkv projection's output: q, k, v side by side.
    b, t, h, d = 2, 40, 3, 8
    q, k, v = qkv_operands(b, t, h, d, seed=4)
    qkv = jnp.concatenate([x.reshape(b, t, h * d) for x in (q, k, v)], axis=-1)
    got = np.asarray(mkl.attention(qkv, h))
    np.testing.assert_allclose(got, numpy_attention(q, k, v).reshape(b, t, h * d),
                               rtol=1e-5, atol=1e-5)


def test_attention_of_an_empty_batch_is_empty():
    qkv = jnp.zeros((0, 8, 3 * 16))
    assert mkl.attention(qkv, 2).shape == (0, 8, 16)
    assert jax.grad(lambda x: mkl.attention(x, 2).sum())(qkv).shape == qkv.shape


def test_attention_rejects_bad_operands():
    with pytest.raises(ValueError, match=r"3 \* n_heads \* head_dim"):
        mkl.attention(jnp.zeros((2, 8, 20)), 3)
    with pytest.raises(ValueError, match=r"3 \* n_heads"):
        mkl.attention(jnp.zeros((8, 24)), 2)
    with pytest.raises(ValueError, match="float32"):
        mkl.attention(jnp.zeros((2, 8, 24), jnp.bfloat16), 2)
    with pytest.raises(ValueError, match="block must be >= 1"):
        mkl.attention(jnp.zeros((2, 8, 24)), 2, None, 0)


def test_attention_model_matches_reference_and_falls_back_under_dropout():
    c = GPTConfig(vocab_size=64, context_length=140, emb_dim=32, n_heads=4, n_layers=2,
                  drop_rate=0.0, attn_impl="reference")
    params = init_params(c, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, 64, size=(2, 140)))
    want = np.asarray(apply(params, tokens, c))
    got = np.asarray(jax.jit(apply, static_argnums=2)(params, tokens, c.replace(attn_impl="mkl")))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # With dropout on, every implementation takes the reference path (it needs the weights).
    drop = c.replace(drop_rate=0.1)
    key = jax.random.key(1)
    np.testing.assert_array_equal(
        np.asarray(apply(params, tokens, drop.replace(attn_impl="mkl"), rng=key)),
        np.asarray(apply(params, tokens, drop, rng=key)))


# -- LayerNorm and column sums ----------------------------------------------------
def formula_layer_norm(x, scale, bias, eps):
    """LayerNorm as its textbook formula, for NumPy (float64) or JAX (autodiff)."""
    xp = jnp if isinstance(x, jax.Array) else np
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / xp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * scale + bias


# 3-D activations split over the pool's threads, a width that is no multiple of
# the vector length, a single row, and a 2-D input.
NORM_SHAPES = [(2, 256, 256), (3, 7, 37), (1, 1, 64), (513, 130)]


@pytest.mark.parametrize("shape", NORM_SHAPES)
def test_layer_norm_matches_numpy(shape):
    rng = np.random.default_rng(6)
    d = shape[-1]
    x = (3.0 * rng.normal(size=shape) + 1.5).astype(np.float32)  # a mean to subtract
    scale, bias = (rng.normal(size=d).astype(np.float32) for _ in range(2))
    g = rng.normal(size=shape).astype(np.float32)
    y, vjp = jax.vjp(jax.jit(lambda x, s, b: mkl.layer_norm(x, s, b, 1e-5)), x, scale, bias)
    # The value in float64; the gradients by autodiff of the formula, independent of
    # the hand-derived backward that the kernel implements.
    value = formula_layer_norm(*(a.astype(np.float64) for a in (x, scale, bias)), 1e-5)
    _, ref_vjp = jax.vjp(lambda x, s, b: formula_layer_norm(x, s, b, 1e-5),
                         *map(jnp.asarray, (x, scale, bias)))
    want = (value, *(np.asarray(r) for r in ref_vjp(jnp.asarray(g))))
    for name, got, ref in zip(("y", "dx", "dscale", "dbias"), (y, *vjp(g)), want):
        assert got.shape == ref.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-5, err_msg=name)


def test_layer_norm_matches_the_xla_path_in_the_model_layer():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(4, 9, 48)), jnp.float32)
    p = {"scale": jnp.asarray(rng.normal(size=48), jnp.float32),
         "bias": jnp.asarray(rng.normal(size=48), jnp.float32)}
    config = GPTConfig(emb_dim=48, n_heads=4, ln_eps=1e-5)
    loss = lambda impl: lambda x, p: jnp.sum(jnp.sin(layer_norm(p, x, config.replace(
        norm_impl=impl))))
    want = jax.value_and_grad(loss("xla"), argnums=(0, 1))(x, p)
    got = jax.jit(jax.value_and_grad(loss("rowwise"), argnums=(0, 1)))(x, p)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="norm_impl must be one of"):
        config.replace(norm_impl="fused")


def test_layer_norm_of_an_empty_batch_is_empty():
    x, s = jnp.zeros((0, 5, 8)), jnp.ones(8)
    assert mkl.layer_norm(x, s, s, 1e-5).shape == x.shape
    grads = jax.grad(lambda x, s: mkl.layer_norm(x, s, s, 1e-5).sum(), argnums=(0, 1))(x, s)
    assert grads[0].shape == x.shape
    np.testing.assert_array_equal(np.asarray(grads[1]), np.zeros(8, np.float32))


def test_layer_norm_rejects_bad_operands():
    with pytest.raises(ValueError, match=r"scale and bias \(d,\)"):
        mkl.layer_norm(jnp.zeros((2, 8)), jnp.ones(4), jnp.ones(8), 1e-5)
    with pytest.raises(ValueError, match="float32"):
        mkl.layer_norm(jnp.zeros((2, 8), jnp.bfloat16), jnp.ones(8, jnp.bfloat16),
                       jnp.ones(8, jnp.bfloat16), 1e-5)


@pytest.mark.parametrize("shape", [(512, 1024), (3, 7), (1, 300), (2, 65536)])
def test_column_sum_matches_numpy(shape):
    g = np.random.default_rng(8).normal(size=shape).astype(np.float32)
    got = np.asarray(jax.jit(mkl.column_sum)(g))
    np.testing.assert_allclose(got, g.astype(np.float64).sum(0), rtol=1e-5, atol=1e-4)
    assert mkl.column_sum(jnp.zeros((0, 4))).shape == (4,)
    with pytest.raises(ValueError, match="2-D float32"):
        mkl.column_sum(jnp.zeros((2, 3, 4)))


def test_bias_gradient_is_the_column_sum():
    rng = np.random.default_rng(9)
    y = jnp.asarray(rng.normal(size=(6, 5, 12)), jnp.float32)
    b = jnp.asarray(rng.normal(size=12), jnp.float32)
    f = lambda impl: lambda y, b: jnp.sum(jnp.cos(impl(y, b)))
    want = jax.grad(f(jnp.add), argnums=(0, 1))(y, b)
    got = jax.jit(jax.grad(f(mkl.add_bias), argnums=(0, 1)))(y, b)
    for g, r in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


def test_norm_kernel_model_matches_xla_and_generates_alike():
    c = GPTConfig(vocab_size=50, context_length=12, emb_dim=16, n_heads=2, n_layers=2,
                  drop_rate=0.0)
    params = init_params(c, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 12), 0, c.vocab_size)
    loss = lambda cfg: jax.jit(jax.value_and_grad(lambda p: jnp.mean(apply(p, tokens, cfg) ** 2)))
    (ref, ref_g), (got, got_g) = loss(c)(params), loss(c.replace(norm_impl="mkl"))(params)
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
    for g, r in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)
    prompts = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    want = generate(params, c, prompts, 10, return_logits=True)
    out = generate(params, c.replace(norm_impl="mkl"), prompts, 10, return_logits=True)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(want.logits), rtol=1e-4,
                               atol=1e-5)


# -- the feed-forward's first layer: product, bias and GELU ------------------------
def numpy_gelu(x):
    """GELU (tanh form) and its derivative in float64."""
    c = np.sqrt(2.0 / np.pi)
    t = np.tanh(c * (x + 0.044715 * x ** 3))
    return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * (1 - t ** 2) * c * (1 + 3 * 0.044715 * x ** 2)


# split by columns (n > m) and by rows (m >= n), a product below the split size,
# and a single row.
@pytest.mark.parametrize("m, k, n", [(512, 256, 1024), (257, 64, 130), (3, 5, 7), (1, 16, 300)])
def test_dense_gelu_matches_numpy(m, k, n):
    rng = np.random.default_rng(10)
    x = rng.normal(size=(m, k)).astype(np.float32)
    w = (3.0 * rng.normal(size=(k, n)) / np.sqrt(k)).astype(np.float32)  # pre-activations up to ~10
    b = rng.normal(size=n).astype(np.float32)
    g = rng.normal(size=(m, n)).astype(np.float32)
    y, vjp = jax.vjp(jax.jit(mkl.dense_gelu), x, w, b)
    pre = x.astype(np.float64) @ w + b
    act, slope = numpy_gelu(pre)
    dpre = g * slope
    want = (act, dpre @ w.T.astype(np.float64), x.T.astype(np.float64) @ dpre, dpre.sum(0))
    for name, got, ref in zip(("y", "dx", "dw", "db"), (y, *vjp(g)), want):
        assert got.shape == ref.shape and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(),
                                   err_msg=name)


def test_dense_gelu_is_accurate_over_the_whole_range():
    # Large |x|: tanh saturates at +-1, exp must neither overflow nor lose the sign.
    u = np.linspace(-40.0, 40.0, 200_001).astype(np.float32)
    one = np.ones((1, 1), np.float32)
    y = np.asarray(jax.jit(mkl.dense_gelu)(u[:, None], one, np.zeros(1, np.float32)))[:, 0]
    u64 = u.astype(np.float64)
    act, slope = numpy_gelu(u64)
    # the reference derivative is the derivative of the reference value
    h = 1e-6
    central = (numpy_gelu(u64 + h)[0] - numpy_gelu(u64 - h)[0]) / (2 * h)
    np.testing.assert_allclose(slope, central, rtol=0, atol=1e-8)
    np.testing.assert_allclose(y, act, rtol=0, atol=1e-6)
    dpre = np.asarray(jax.grad(lambda v: mkl.dense_gelu(v, one, np.zeros(1, np.float32)).sum())(
        jnp.asarray(u[:, None])))[:, 0]
    np.testing.assert_allclose(dpre, slope, rtol=0, atol=1e-6)


def test_dense_gelu_edge_cases_and_errors():
    w, b = jnp.ones((4, 3)), jnp.zeros(3)
    assert mkl.dense_gelu(jnp.zeros((0, 4)), w, b).shape == (0, 3)
    grads = jax.grad(lambda x, w, b: mkl.dense_gelu(x, w, b).sum(), argnums=(0, 1, 2))(
        jnp.zeros((0, 4)), w, b)
    assert [g.shape for g in grads] == [(0, 4), (4, 3), (3,)]
    with pytest.raises(ValueError, match=r"bias of shape \(3,\)"):
        mkl.dense_gelu(jnp.ones((2, 4)), w, jnp.zeros(4))
    with pytest.raises(ValueError, match="contracting"):
        mkl.dense_gelu(jnp.ones((2, 5)), w, b)


def nll_float64(logits, targets):
    """-log softmax per row and its gradient (softmax - one_hot), in float64."""
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    onehot = np.zeros_like(x)  # not np.eye(vocab): that would be vocab^2 numbers
    np.put_along_axis(onehot, targets[..., None], 1.0, axis=-1)
    return -np.take_along_axis(logp, targets[..., None], -1)[..., 0], np.exp(logp) - onehot


@pytest.mark.parametrize("shape", [(4, 2048), (2, 3, 7), (1, 50257), (5, 1)])
def test_token_nll_matches_float64(shape):
    rng = np.random.default_rng(11)
    logits = (rng.normal(size=shape) * 4).astype(np.float32)
    targets = rng.integers(0, shape[-1], size=shape[:-1])
    weights = rng.normal(size=shape[:-1]).astype(np.float32)  # d loss / d nll per row
    want, want_grad = nll_float64(logits, targets)
    got, vjp = jax.vjp(lambda x: mkl.token_nll(x, jnp.asarray(targets)), jnp.asarray(logits))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=2e-6)
    np.testing.assert_allclose(np.asarray(vjp(jnp.asarray(weights))[0]),
                               want_grad * weights[..., None], rtol=1e-5, atol=1e-7)


def test_token_nll_non_finite_logits_and_bad_targets_match_xla():
    from jaxllm.loss import token_nll

    logits = jnp.asarray(np.random.default_rng(12).normal(size=(6, 9)).astype(np.float32))
    logits = (logits.at[1, 2].set(jnp.nan).at[2, 4].set(jnp.inf)
              .at[4, :3].set(-jnp.inf).at[5, :].set(-jnp.inf))
    targets = jnp.array([0, 1, 2, 9, 5, 3])  # row 3: a target past the vocabulary
    got, want = mkl.token_nll(logits, targets), token_nll(logits, targets)
    # NaN where a logit is NaN, the target invalid, or every logit -inf; +inf
    # where a logit is +inf
    assert np.isnan(np.asarray(got)).tolist() == [False, True, False, True, False, True]
    assert float(got[2]) == np.inf
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    grad = jax.grad(lambda x: mkl.token_nll(x, targets)[4])(logits)
    assert np.all(np.asarray(grad[4, :3]) == 0.0)  # -inf logits take no probability
    np.testing.assert_allclose(np.asarray(grad[4]), np.asarray(
        jax.grad(lambda x: token_nll(x, targets)[4])(logits)[4]), rtol=1e-5, atol=1e-7)


def test_token_nll_edge_cases_and_errors():
    assert mkl.token_nll(jnp.zeros((0, 5)), jnp.zeros((0,), jnp.int32)).shape == (0,)
    assert np.isnan(np.asarray(mkl.token_nll(jnp.zeros((2, 0)), jnp.zeros(2, jnp.int32)))).all()
    with pytest.raises(ValueError, match="targets of their leading shape"):
        mkl.token_nll(jnp.zeros((2, 5)), jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match="float32 logits"):
        mkl.token_nll(jnp.zeros((2, 5), jnp.bfloat16), jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match="integer targets"):
        mkl.token_nll(jnp.zeros((2, 5)), jnp.zeros(2))
    with pytest.raises(ValueError, match="impl must be one of"):
        cross_entropy(jnp.zeros((2, 5)), jnp.zeros(2, jnp.int32), impl="fused")


def test_loss_kernel_in_the_model_matches_xla_with_padding_and_mask():
    # vocab 50 padded to 64: the padding logits (-1e30) must take no probability
    c = GPTConfig(vocab_size=50, context_length=16, emb_dim=16, n_heads=2, n_layers=1,
                  drop_rate=0.0, vocab_multiple=64)
    params = init_params(c, jax.random.key(0))
    rng = np.random.default_rng(13)
    x, y = (jnp.asarray(rng.integers(0, 50, size=(3, 16))) for _ in range(2))
    mask = jnp.asarray(rng.random((3, 16)) < 0.5)

    def loss(config):
        return jax.jit(jax.value_and_grad(lambda p: lm_loss(p, x, y, config, mask=mask)))(params)

    (ref, ref_g), (got, got_g) = loss(c), loss(c.replace(loss_impl="mkl"))
    np.testing.assert_allclose(float(got), float(ref), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
