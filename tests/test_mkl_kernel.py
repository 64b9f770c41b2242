"""The MKL matrix-product kernel (`GPTConfig.matmul_impl="mkl"`) against NumPy and XLA.

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

from jaxllm.config import GPTConfig
from jaxllm.generate import generate
from jaxllm.kernels import mkl
from jaxllm.model import apply, init_params
from jaxllm.sharding import _check_matmul_impl

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
    _check_matmul_impl(GPTConfig(matmul_impl="mkl"), types.SimpleNamespace(size=1))
    with pytest.raises(ValueError, match="one CPU device"):
        _check_matmul_impl(GPTConfig(matmul_impl="mkl"), types.SimpleNamespace(size=2))


def test_cached_generation_matches_xla():
    c = GPTConfig(vocab_size=50, context_length=12, emb_dim=16, n_heads=2, n_layers=2,
                  drop_rate=0.0)
    params = init_params(c, jax.random.key(0))
    prompts = np.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    ref = generate(params, c, prompts, 10, return_logits=True)  # slides past the context
    got = generate(params, c.replace(matmul_impl="mkl"), prompts, 10, return_logits=True)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(ref.logits), rtol=1e-4, atol=1e-5)
