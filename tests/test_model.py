"""Properties of the GPT-2 model that hold whatever the weights: causality,
dropout, parameter count, initialisation, jit behaviour, attention kernels
agreeing with each other, and clear errors for bad input."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import (GPT_CONFIG_124M, GPTConfig, count_params, cross_entropy, forward,
                    from_hf_state_dict, init_params, lm_loss, to_hf_state_dict)
from jaxllm.attention import causal_attention
from jaxllm.ops.xla import matmul as xla_matmul


def layer_norm(p, x, eps):
    from jaxllm.ops import xla

    return xla.layer_norm(x, p["scale"], p["bias"], eps)

TINY = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                 drop_rate=0.0, attn_impl="reference")


@pytest.fixture(scope="module")
def params():
    return init_params(TINY, jax.random.key(0))


def tokens_for(config: GPTConfig, shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.vocab_size, size=shape)


# Value checks run jitted: one compilation per config and shape, where the eager
# API would compile every primitive on its own.
jitted_forward = jax.jit(forward, static_argnames=("config", "train"))


def size_of(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


# -- causality -------------------------------------------------------------------
@pytest.mark.parametrize("config", [
    TINY,
    # 128 positions: blockwise really splits into query blocks of 64.
    TINY.replace(attn_impl="blockwise", context_length=128),
], ids=["reference", "blockwise-2-blocks"])
def test_logits_depend_only_on_earlier_positions(config):
    """d logits[t] / d (embedding output at s) is exactly zero for every s > t and
    non-zero for s <= t. A row of the position table is an additive perturbation
    of the embedding output at that one position."""
    params = init_params(config, jax.random.key(1))
    seq = config.context_length
    tokens = tokens_for(config, (1, seq), seed=2)
    probe = jax.random.normal(jax.random.key(3), (config.vocab_size,))

    def logit_at(pos_table, t):
        p = {**params, "pos_emb": {"embedding": pos_table}}
        return forward(p, tokens, config)[0, t] @ probe

    jac = jax.jit(jax.vmap(jax.grad(logit_at), in_axes=(None, 0)))(
        params["pos_emb"]["embedding"], jnp.arange(seq))  # (t, s, emb)
    influence = np.abs(np.asarray(jac)).max(-1)  # (t, s)
    future = np.triu(np.ones((seq, seq), bool), k=1)
    assert np.all(influence[future] == 0.0), "a position sees a later one"
    assert np.all(influence[~future] > 0.0), "a position does not see an earlier one"


def test_changing_later_tokens_leaves_earlier_logits_unchanged(params):
    tokens = tokens_for(TINY, (2, 16), seed=5)
    changed = tokens.copy()
    changed[:, 9:] = (changed[:, 9:] + 1) % TINY.vocab_size
    a, b = jitted_forward(params, tokens, TINY), jitted_forward(params, changed, TINY)
    assert np.array_equal(a[:, :9], b[:, :9])
    assert not np.allclose(a[:, 9:], b[:, 9:])


# -- dropout ---------------------------------------------------------------------
def test_dropout_only_in_training():
    config = TINY.replace(drop_rate=0.2)
    params = init_params(config, jax.random.key(0))
    tokens = tokens_for(config, (2, 16))
    eval_a = jitted_forward(params, tokens, config, train=False, rng=jax.random.key(9))
    eval_b = jitted_forward(params, tokens, config, train=False, rng=jax.random.key(10))
    assert np.array_equal(eval_a, eval_b)
    # Evaluation is the model without dropout.
    assert np.array_equal(eval_a, jitted_forward(params, tokens, config.replace(drop_rate=0.0)))

    train_1 = jitted_forward(params, tokens, config, train=True, rng=jax.random.key(1))
    train_1_again = jitted_forward(params, tokens, config, train=True, rng=jax.random.key(1))
    train_2 = jitted_forward(params, tokens, config, train=True, rng=jax.random.key(2))
    assert np.array_equal(train_1, train_1_again)
    assert not np.allclose(train_1, train_2)
    assert not np.allclose(train_1, eval_a)

    with pytest.raises(ValueError, match="rng"):
        forward(params, tokens, config, train=True)
    with pytest.raises(ValueError, match="rng"):
        lm_loss(params, tokens, tokens, config, train=True)


# -- parameter count and initialisation --------------------------------------------
@pytest.mark.parametrize("config", [
    TINY,
    TINY.replace(tie_embeddings=True),
    TINY.replace(qkv_bias=True),
    TINY.replace(ffn_dim=48, tie_embeddings=True, qkv_bias=True),
    TINY.replace(n_layers=3, vocab_multiple=64),
], ids=["untied", "tied", "qkv_bias", "ffn48-tied-bias", "padded-vocab"])
def test_count_params_equals_initialised_size(config):
    shapes = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
    assert count_params(config) == size_of(shapes)
    d, h, v = config.emb_dim, config.hidden_dim, config.padded_vocab_size
    per_block = (2 * 2 * d + d * 3 * d + (3 * d if config.qkv_bias else 0) + d * d + d
                 + d * h + h + h * d + d)
    expected = (v * d + config.context_length * d + config.n_layers * per_block + 2 * d
                + (0 if config.tie_embeddings else d * v))
    assert count_params(config) == expected


def test_gpt2_124m_parameter_count():
    # Published figures: 163,009,536 with a separate output head, 124,412,160 tied.
    assert count_params(GPT_CONFIG_124M) == 163_009_536
    assert count_params(GPT_CONFIG_124M.replace(tie_embeddings=True)) == 124_412_160


def test_init_statistics():
    config = GPTConfig(vocab_size=300, context_length=64, emb_dim=64, n_heads=4, n_layers=4,
                       drop_rate=0.0, qkv_bias=True)
    p = init_params(config, jax.random.key(0))
    resid_std = 0.02 / math.sqrt(2 * config.n_layers)

    def check_std(x, want, what):
        x = np.asarray(x)
        assert abs(x.std() / want - 1) < 0.06, f"{what}: std {x.std():.4g}, want {want:.4g}"
        assert abs(x.mean()) < 4 * want / math.sqrt(x.size), f"{what}: mean {x.mean():.3g}"

    check_std(p["tok_emb"]["embedding"], 0.02, "tok_emb")
    check_std(p["pos_emb"]["embedding"], 0.02, "pos_emb")
    check_std(p["out_head"]["kernel"], 0.02, "out_head")
    for i, blk in enumerate(p["blocks"]):
        check_std(blk["attn"]["qkv"]["kernel"], 0.02, f"block {i} qkv")
        check_std(blk["ffn"]["fc"]["kernel"], 0.02, f"block {i} fc")
        check_std(blk["attn"]["out"]["kernel"], resid_std, f"block {i} attn out")
        check_std(blk["ffn"]["proj"]["kernel"], resid_std, f"block {i} ffn proj")
        for bias in (blk["attn"]["qkv"]["bias"], blk["attn"]["out"]["bias"],
                     blk["ffn"]["fc"]["bias"], blk["ffn"]["proj"]["bias"]):
            assert np.all(np.asarray(bias) == 0)
        for norm in (blk["norm1"], blk["norm2"]):
            assert np.all(np.asarray(norm["scale"]) == 1) and np.all(np.asarray(norm["bias"]) == 0)
    assert np.all(np.asarray(p["final_norm"]["scale"]) == 1)
    # Every matrix has its own random draw.
    kernels = [p["tok_emb"]["embedding"][:64, :64], p["pos_emb"]["embedding"][:64, :64],
               p["out_head"]["kernel"][:64, :64]]
    kernels += [b["attn"]["qkv"]["kernel"][:, :64] for b in p["blocks"]]
    kernels += [b["ffn"]["fc"]["kernel"][:, :64] for b in p["blocks"]]
    flat = np.stack([np.asarray(k).ravel() / np.asarray(k).std() for k in kernels])
    corr = np.corrcoef(flat) - np.eye(len(kernels))
    assert np.abs(corr).max() < 0.1
    # Same key, same parameters; another key, others.
    again = init_params(config, jax.random.key(0))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), p, again))
    other = init_params(config, jax.random.key(1))
    assert not np.array_equal(p["tok_emb"]["embedding"], other["tok_emb"]["embedding"])


# -- jit -----------------------------------------------------------------------------
def test_forward_jits_with_static_config_and_compiles_once(params):
    traces = []

    def counted_forward(p, tokens, config):
        traces.append(tokens.shape)  # runs only while tracing
        return forward(p, tokens, config)

    jitted = jax.jit(counted_forward, static_argnames="config")
    a, b = tokens_for(TINY, (1, 16), seed=1), tokens_for(TINY, (1, 16), seed=2)
    out_a = jitted(params, a, TINY)
    out_b = jitted(params, b, TINY)
    assert len(traces) == 1 and jitted._cache_size() == 1
    np.testing.assert_allclose(out_a, forward(params, a, TINY), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out_b, forward(params, b, TINY), atol=1e-5, rtol=0)
    # An equal config (a different object) is the same static argument.
    jitted(params, a, TINY.replace(drop_rate=0.0))
    assert len(traces) == 1
    # A new shape compiles again.
    jitted(params, a[:, :8], TINY)
    assert len(traces) == 2 and jitted._cache_size() == 2


# -- attention kernels ---------------------------------------------------------------
def numpy_causal_attention(q, k, v):
    """Causal softmax attention, one query at a time, in float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    out = np.zeros_like(q)
    for t in range(q.shape[1]):
        s = np.einsum("bhd,bshd->bhs", q[:, t], k[:, : t + 1]) / math.sqrt(q.shape[-1])
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        out[:, t] = np.einsum("bhs,bshd->bhd", w, v[:, : t + 1])
    return out


def _textbook_layer_norm(x, scale, bias, eps):
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) / jnp.sqrt(var + eps) * scale + bias).astype(x.dtype)


def test_layer_norm_gradient_equals_autodiff_of_the_formula():
    keys = jax.random.split(jax.random.key(3), 4)
    x = 3.0 * jax.random.normal(keys[0], (2, 5, 32)) + 1.5
    p = {"scale": 1.0 + 0.1 * jax.random.normal(keys[1], (32,)),
         "bias": 0.1 * jax.random.normal(keys[2], (32,))}
    cot = jax.random.normal(keys[3], x.shape)

    def loss(fn):
        return lambda x, s, b: jnp.sum(fn(x, s, b) * cot)

    ours = jax.grad(loss(lambda x, s, b: layer_norm({"scale": s, "bias": b}, x, 1e-5)),
                    argnums=(0, 1, 2))(x, p["scale"], p["bias"])
    ref = jax.grad(loss(lambda x, s, b: _textbook_layer_norm(x, s, b, 1e-5)),
                   argnums=(0, 1, 2))(x, p["scale"], p["bias"])
    np.testing.assert_allclose(layer_norm(p, x, 1e-5), _textbook_layer_norm(x, p["scale"], p["bias"], 1e-5),
                               atol=1e-6)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_layer_norm_keeps_dtypes_in_bfloat16():
    x = jax.random.normal(jax.random.key(0), (4, 16), jnp.bfloat16)
    p = {"scale": jnp.ones((16,), jnp.bfloat16), "bias": jnp.zeros((16,), jnp.bfloat16)}
    y, vjp = jax.vjp(lambda x, p: layer_norm(p, x, 1e-5), x, p)
    dx, dp = vjp(jnp.ones_like(y))
    assert y.dtype == dx.dtype == dp["scale"].dtype == dp["bias"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(dp["bias"], np.float32), 4.0)


@pytest.mark.parametrize("transpose_w", [False, True], ids=["x@w", "x@w.T"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_xla_matmul_gradients_equal_autodiff(transpose_w, dtype):
    kx, kw, kg = jax.random.split(jax.random.key(4), 3)
    x = jax.random.normal(kx, (24, 16), dtype)
    w = jax.random.normal(kw, (40, 16) if transpose_w else (16, 40), dtype)
    cot = jax.random.normal(kg, (24, 40), dtype)

    def plain(x, w):
        return jnp.einsum("nd,vd->nv", x, w) if transpose_w else x @ w

    grad = jax.jit(jax.grad(lambda x, w: jnp.sum(xla_matmul(x, w, transpose_w) * cot), (0, 1)))
    ours = grad(x, w)
    ref = jax.grad(lambda x, w: jnp.sum(plain(x, w) * cot), (0, 1))(x, w)
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(xla_matmul(x, w, transpose_w).astype(jnp.float32),
                               plain(x, w).astype(jnp.float32), rtol=tol, atol=tol)
    for a, b, primal in zip(ours, ref, (x, w)):
        assert a.dtype == primal.dtype and a.shape == primal.shape
        np.testing.assert_allclose(a.astype(jnp.float32), b.astype(jnp.float32), rtol=tol, atol=tol)
    # On the CPU no product reads its left operand transposed in place (autodiff's
    # weight gradient does: lhs_contracting_dims={0}); it gets a transposed copy.
    if jax.default_backend() == "cpu":
        assert "lhs_contracting_dims={0}" not in grad.lower(x, w).compile().as_text()


def test_xla_matmul_takes_2d_operands_only():
    # Its backward transposes an operand with .T, which would reverse a batch axis too.
    with pytest.raises(ValueError, match="2-D operands"):
        xla_matmul(jnp.ones((2, 4, 3)), jnp.ones((3, 2)))


@pytest.mark.parametrize("seq", [100, 192], ids=lambda s: f"seq{s}")
def test_attention_implementations_agree(seq):
    """All kernels against a float64 loop; 192 is a multiple of the blockwise
    kernel's block (64), 100 is not."""
    kq, kk, kv = jax.random.split(jax.random.key(seq), 3)
    shape = (2, seq, 4, 16)
    q, k, v = (jax.random.normal(key, shape) for key in (kq, kk, kv))
    expected = numpy_causal_attention(q, k, v)
    for impl in ("reference", "blockwise", "xla"):
        out = np.asarray(jax.jit(causal_attention, static_argnums=3)(q, k, v, impl))
        err = np.abs(out - expected).max()
        assert err < 1e-5, f"{impl} at seq {seq}: max error {err:.3g}"


def test_model_attention_implementations_agree():
    config = TINY.replace(context_length=128)
    params = init_params(config, jax.random.key(2))
    tokens = tokens_for(config, (2, 128))  # two blocks of 64 for `blockwise`
    ref = jitted_forward(params, tokens, config)
    for impl in ("blockwise", "xla"):
        err = np.abs(jitted_forward(params, tokens, config.replace(attn_impl=impl)) - ref).max()
        assert err < 1e-5, f"{impl}: {err:.3g}"


def test_unknown_attention_implementation():
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="flash"):
        causal_attention(q, q, q, "flash")


# -- bad input -----------------------------------------------------------------------
@pytest.mark.parametrize("bad_id", [-1, 97, 1000])
def test_out_of_range_ids_are_errors(params, bad_id):
    tokens = tokens_for(TINY, (2, 16))
    tokens[1, 3] = bad_id
    good = tokens_for(TINY, (2, 16), seed=1)
    with pytest.raises(ValueError, match=f"id {bad_id}, outside \\[0, 97\\)"):
        forward(params, tokens, TINY)
    with pytest.raises(ValueError, match=f"inputs contains id {bad_id}"):
        lm_loss(params, tokens, good, TINY)
    with pytest.raises(ValueError, match=f"targets contains id {bad_id}"):
        lm_loss(params, good, tokens, TINY)


@pytest.mark.parametrize("bad_id", [-1, -97, 97, 1000])
def test_out_of_range_ids_under_jit_give_nan(params, bad_id):
    tokens = tokens_for(TINY, (2, 16))
    tokens[1, 5] = bad_id
    logits = np.asarray(jitted_forward(params, tokens, TINY))
    assert np.all(np.isfinite(logits[0])), "a clean sequence is affected"
    # From the bad position on the sequence is NaN (attention spreads it further:
    # 0 * NaN is NaN, so earlier positions may be NaN too; never a finite guess).
    assert np.all(np.isnan(logits[1, 5:])), "the bad id must give NaN logits"

    loss = jax.jit(lm_loss, static_argnames="config")
    good = tokens_for(TINY, (2, 16), seed=1)
    assert np.isnan(loss(params, tokens, good, TINY))
    assert np.isnan(loss(params, good, tokens, TINY))
    assert np.isfinite(loss(params, good, good, TINY))


def test_cross_entropy_with_bad_targets():
    """A bad target id is NaN, never a wrapped-around row, unless the mask drops it."""
    logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
    targets = np.array([[0, 4, 2], [1, -1, 3]])
    mask = np.array([[1, 1, 1], [1, 0, 1]])
    ce = jax.jit(cross_entropy)
    assert np.isnan(ce(logits, targets))
    masked = ce(logits, targets, mask)
    clean = np.where(mask == 1, targets, 0)
    np.testing.assert_allclose(masked, ce(logits, clean, mask), rtol=1e-6)
    assert np.isnan(ce(logits, np.where(mask == 1, targets, 5)))


def test_padding_ids_under_jit_give_nan():
    """With a padded vocabulary, ids in [vocab_size, padded size) are invalid too."""
    config = TINY.replace(vocab_multiple=64)  # 97 rows padded to 128
    params = init_params(config, jax.random.key(0))
    tokens = np.stack([tokens_for(config, (16,)), tokens_for(config, (16,), seed=1)])
    tokens[1, 2] = 100
    logits = np.asarray(jitted_forward(params, tokens, config))
    assert logits.shape == (2, 16, 97)
    assert np.all(np.isfinite(logits[0])) and np.all(np.isnan(logits[1, 2:]))


def test_malformed_token_arrays(params):
    with pytest.raises(ValueError, match="longer than the context length 16"):
        forward(params, tokens_for(TINY, (1, 17)), TINY)
    with pytest.raises(ValueError, match="integer token ids, got dtype float32"):
        forward(params, np.zeros((1, 4), np.float32), TINY)
    with pytest.raises(ValueError, match=r"shape \(seq,\) or \(batch, seq\), got \(1, 2, 4\)"):
        forward(params, np.zeros((1, 2, 4), np.int32), TINY)
    with pytest.raises(ValueError, match="empty"):
        forward(params, np.zeros((1, 0), np.int32), TINY)
    with pytest.raises(ValueError, match="empty"):
        forward(params, np.zeros((0, 4), np.int32), TINY)
    good = tokens_for(TINY, (2, 16))
    with pytest.raises(ValueError, match="differ in shape"):
        lm_loss(params, good, good[:, :8], TINY)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 8\)"):
        lm_loss(params, good, good, TINY, mask=np.ones((2, 8)))


def test_one_sequence_equals_a_batch_of_one(params):
    tokens = tokens_for(TINY, (16,))
    single = forward(params, tokens, TINY)
    assert single.shape == (16, 97)
    assert np.array_equal(single, forward(params, tokens[None], TINY)[0])
    assert np.array_equal(single, forward(params, [int(i) for i in tokens], TINY))  # a list
    targets = tokens_for(TINY, (16,), seed=3)
    assert float(lm_loss(params, tokens, targets, TINY)) == float(
        lm_loss(params, tokens[None], targets[None], TINY))


# -- weights from another configuration -------------------------------------------------
@pytest.fixture(scope="module")
def state_dict(params):
    return to_hf_state_dict(params, TINY)


def test_state_dict_with_wrong_shapes(state_dict):
    with pytest.raises(ValueError, match=r"transformer\.wte\.weight: state dict has shape "
                                         r"\(97, 32\), config expects \(101, 32\)"):
        from_hf_state_dict(state_dict, TINY.replace(vocab_size=101))
    with pytest.raises(ValueError, match=r"mlp\.c_fc\.weight: state dict has shape "
                                         r"\(32, 128\), config expects \(32, 64\)"):
        from_hf_state_dict(state_dict, TINY.replace(ffn_dim=64))


def test_state_dict_with_missing_or_unexpected_keys(state_dict):
    with pytest.raises(ValueError, match=r"missing key.*transformer\.h\.2\.attn\.c_attn\.weight"):
        from_hf_state_dict(state_dict, TINY.replace(n_layers=3))
    with pytest.raises(ValueError, match=r"unexpected key.*transformer\.h\.1\.ln_1\.weight"):
        from_hf_state_dict(state_dict, TINY.replace(n_layers=1))
    without_head = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match=r"missing key.*lm_head\.weight"):
        from_hf_state_dict(without_head, TINY)
    from_hf_state_dict(without_head, TINY.replace(tie_embeddings=True))  # tied: not needed
    with pytest.raises(ValueError, match=r"unexpected key.*'extra\.weight'"):
        from_hf_state_dict({**state_dict, "extra.weight": np.zeros(3, np.float32)}, TINY)


def test_state_dict_that_the_config_cannot_represent(state_dict):
    with_bias = dict(state_dict)
    with_bias["transformer.h.1.attn.c_attn.bias"] = np.full((96,), 0.5, np.float32)
    with pytest.raises(ValueError, match=r"transformer\.h\.1\.attn\.c_attn\.bias is non-zero.*"
                                         r"qkv_bias=False"):
        from_hf_state_dict(with_bias, TINY)
    # Untied weights (lm_head differs from wte) cannot load into a tied config.
    with pytest.raises(ValueError, match=r"lm_head\.weight differs.*tie_embeddings=True"):
        from_hf_state_dict(state_dict, TINY.replace(tie_embeddings=True))



def test_torch_init_scheme_matches_pytorch_defaults():
    """scheme="torch": embeddings N(0, 1), weights and biases U(+-1/sqrt(fan_in))."""
    config = GPTConfig(vocab_size=512, context_length=64, emb_dim=128, n_heads=4,
                              n_layers=2, qkv_bias=True, drop_rate=0.0)
    params = init_params(config, jax.random.key(0), scheme="torch")
    emb = np.asarray(params["tok_emb"]["embedding"])
    assert abs(emb.std() - 1.0) < 0.02 and abs(emb.mean()) < 0.02
    for name, layer, fan_in in (("qkv", params["blocks"][0]["attn"]["qkv"], 128),
                                ("fc", params["blocks"][1]["ffn"]["fc"], 128),
                                ("proj", params["blocks"][1]["ffn"]["proj"], 512),
                                ("out_head", params["out_head"], 128)):
        bound = 1.0 / np.sqrt(fan_in)
        kernel = np.asarray(layer["kernel"])
        assert np.abs(kernel).max() <= bound, name
        # a uniform on [-b, b] has standard deviation b / sqrt(3)
        assert abs(kernel.std() - bound / np.sqrt(3)) < 0.05 * bound, name
        if "bias" in layer:
            assert np.abs(np.asarray(layer["bias"])).max() <= bound and np.any(layer["bias"] != 0)
    with pytest.raises(ValueError, match="init scheme"):
        init_params(config, jax.random.key(0), scheme="xavier")
