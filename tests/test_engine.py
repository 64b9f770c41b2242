"""The task-generic train step: pretraining through it, masks, frozen leaves,
accumulation, and a task with its own head and labels."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxllm
from jaxllm.config import GPTConfig
from jaxllm.loss import cross_entropy, lm_loss, token_loss_sum
from jaxllm.model import apply, init_params, lm_head
from jaxllm.parity import assert_passed, gpt2 as gpt2_parity
from jaxllm.train import (TrainConfig, count_trainable, init_train_state, lm_batch, lm_task,
                          make_eval_step, make_optimizer, make_train_step, trainable_mask)
from jaxllm.train.optim import lr_schedule

CONFIG = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                   drop_rate=0.1)
TC = TrainConfig(lr=3e-3, warmup_steps=1, total_steps=10, batch_size=8)


def data(n, seed=0, config=CONFIG):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, config.vocab_size, (8, 12)).astype(np.int32),
             rng.integers(0, config.vocab_size, (8, 12)).astype(np.int32)) for _ in range(n)]


def reference_step(config, tc):
    """The pretraining step as it was before tasks: the gradient of the mean LM
    loss of each micro-batch weighted 1/grad_accum, every parameter trained."""
    optimizer, schedule, accum = make_optimizer(tc), lr_schedule(tc), tc.grad_accum

    def loss_fn(params, x, y, rng, weight):
        logits = apply(params, x, config, rng=rng, upcast_logits=False)
        return weight * cross_entropy(logits, y, impl=config.loss_impl)

    grad_fn = jax.value_and_grad(loss_fn)

    @jax.jit
    def step(state, x, y):
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if accum == 1:
            loss, grads = grad_fn(state.params, x, y, key, 1.0)
        else:
            b = x.shape[0] // accum
            loss, grads = 0.0, jax.tree.map(jnp.zeros_like, state.params)
            for i in range(accum):
                sl = slice(i * b, (i + 1) * b)
                l, g = grad_fn(state.params, x[sl], y[sl], jax.random.fold_in(key, i), 1 / accum)
                loss, grads = loss + l, jax.tree.map(jnp.add, grads, g)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return state._replace(step=state.step + 1, params=params, opt_state=opt_state), \
            {"loss": loss, "lr": schedule(state.step)}

    return step


@pytest.mark.parametrize("config", [CONFIG, CONFIG.replace(drop_rate=0.0, tie_embeddings=True)])
def test_pretraining_through_the_task_step_gives_bitwise_the_same_losses(config):
    params = init_params(config, jax.random.key(0))
    ref, new = init_train_state(params, TC), init_train_state(params, TC)
    ref_step, new_step = reference_step(config, TC), make_train_step(config, TC)
    for x, y in data(5):
        ref, mr = ref_step(ref, x, y)
        new, mn = new_step(new, lm_batch(x, y))
        assert np.asarray(mr["loss"]).tobytes() == np.asarray(mn["loss"]).tobytes()
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(new.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_accumulated_pretraining_equals_the_weighted_micro_batches():
    tc = TC.replace(grad_accum=2)
    params = init_params(CONFIG, jax.random.key(1))
    ref, new = init_train_state(params, tc), init_train_state(params, tc)
    ref_step, new_step = reference_step(CONFIG, tc), make_train_step(CONFIG, tc)
    for x, y in data(3):
        ref, mr = ref_step(ref, x, y)
        new, mn = new_step(new, lm_batch(x, y))
        np.testing.assert_allclose(float(mn["loss"]), float(mr["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(ref.params), jax.tree.leaves(new.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_hidden_states_and_head_split_the_model():
    config = CONFIG.replace(drop_rate=0.0, vocab_multiple=8)
    params = init_params(config, jax.random.key(2))
    x = data(1, config=config)[0][0]
    hidden = apply(params, x, config, return_hidden=True)
    assert hidden.shape == (8, 12, config.emb_dim)
    # after the final LayerNorm: each position has mean 0 and variance 1 before scale and bias
    np.testing.assert_allclose(np.asarray(hidden.mean(-1)), 0.0, atol=1e-5)
    logits = lm_head(params, hidden, config)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(apply(params, x, config)))
    assert logits.shape[-1] == config.padded_vocab_size
    assert float(logits[..., config.vocab_size:].max()) < -1e29


def test_lm_loss_ignores_minus_100_like_torch():
    config = CONFIG.replace(drop_rate=0.0)
    params = init_params(config, jax.random.key(3))
    x, y = data(1, config=config)[0]
    y = y.copy()
    y[:, :5] = -100
    y[3] = -100
    ours = float(lm_loss(params, x, y, config))
    # against torch's cross_entropy(ignore_index=-100) on transformers' logits: the
    # parity check (`jaxllm parity`), a row ignored whole among them
    assert_passed(gpt2_parity.masked_loss())
    # the same as a 0/1 mask over the kept positions
    keep = (y != -100).astype(np.float32)
    masked = float(lm_loss(params, x, np.where(y < 0, 0, y), config, mask=keep))
    np.testing.assert_allclose(ours, masked, rtol=1e-6)
    with pytest.raises(ValueError, match="targets contains id -7"):
        lm_loss(params, x, np.full_like(y, -7), config)


def test_a_counted_bad_target_makes_the_loss_nan_under_jit():
    logits = jnp.zeros((2, 3, 5))
    targets = jnp.array([[0, 1, 9], [2, -100, 3]])
    total, count = jax.jit(token_loss_sum)(logits, targets)
    assert np.isnan(float(total)) and float(count) == 5.0
    masked = jnp.array([[1, 1, 0], [1, 1, 1]])
    total, count = jax.jit(token_loss_sum)(logits, targets, masked)
    assert np.isfinite(float(total)) and float(count) == 4.0


def test_frozen_leaves_get_no_gradient_no_moments_and_stay_bitwise():
    trainable = r"blocks/1/.*|final_norm/.*"
    params = init_params(CONFIG, jax.random.key(4))
    state = init_train_state(params, TC, trainable=trainable)
    mask = trainable_mask(params, trainable)
    n_train = sum(jax.tree.leaves(mask))
    assert 0 < n_train < len(jax.tree.leaves(params))
    mu = state.opt_state[1][0].mu  # clip, then adamw's scale_by_adam
    assert len(jax.tree.leaves(mu)) == n_train
    assert count_trainable(params, trainable) == sum(p.size for p in jax.tree.leaves(mu))
    before = jax.tree.map(np.asarray, params)
    step = make_train_step(CONFIG, TC, trainable=trainable)
    for x, y in data(3):
        state, metrics = step(state, lm_batch(x, y))
    for m, a, b in zip(jax.tree.leaves(mask), jax.tree.leaves(before),
                       jax.tree.leaves(state.params)):
        if m:
            assert not np.array_equal(a, np.asarray(b))
        else:
            assert a.tobytes() == np.asarray(b).tobytes()
    # the gradient norm covers the trainable leaves only
    p = jax.tree.map(jnp.asarray, before)
    x, y = data(1, seed=9)[0]
    g = jax.grad(lambda q: lm_loss(q, x, y, CONFIG.replace(drop_rate=0.0)))(p)
    fresh = init_train_state(p, TC.replace(grad_clip=None), trainable=trainable)
    _, m = make_train_step(CONFIG.replace(drop_rate=0.0), TC.replace(grad_clip=None),
                           trainable=trainable)(fresh, lm_batch(x, y))
    want = np.sqrt(sum(float(jnp.sum(l ** 2)) for k, l in zip(jax.tree.leaves(mask),
                                                                 jax.tree.leaves(g)) if k))
    np.testing.assert_allclose(float(m["grad_norm"]), want, rtol=1e-5)


def test_trainable_selection_errors_and_predicates():
    params = init_params(CONFIG, jax.random.key(5))
    with pytest.raises(ValueError, match="matches no parameter"):
        trainable_mask(params, r"block/.*")
    with pytest.raises(ValueError, match="does not compile"):
        trainable_mask(params, r"blocks/(")
    by_rank = trainable_mask(params, lambda path, leaf: leaf.ndim == 1)
    assert all(m == (p.ndim == 1) for m, p in zip(jax.tree.leaves(by_rank),
                                                  jax.tree.leaves(params)))


def test_masked_accumulation_is_the_masked_mean_of_the_whole_batch():
    config = CONFIG.replace(drop_rate=0.0)
    tc = TC.replace(grad_clip=None)
    opt = optax.sgd(0.5)
    params = init_params(config, jax.random.key(6))
    x, y = data(1)[0]
    mask = np.zeros((8, 12), np.float32)
    mask[:4, :2] = 1  # the first micro-batch counts 8 positions
    mask[4:, :] = 1  # the second 48
    batch = lm_batch(x, y, mask)
    results = []
    for accum in (1, 2, 4):
        t = tc.replace(grad_accum=accum)
        state = init_train_state(jax.tree.map(jnp.copy, params), t, opt)  # the step donates it
        state, m = make_train_step(config, t, opt)(state, batch)
        results.append((m, state.params))
    want = float(lm_loss(params, x, y, config, mask=mask))
    for m, p in results:
        np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-6)
        assert float(m["count"]) == 56.0
        for a, b in zip(jax.tree.leaves(results[0][1]), jax.tree.leaves(p)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def classify(params, batch, config, rng):
    """A task with its own head and (batch,) labels: the last position's hidden state."""
    hidden = apply(params, batch["tokens"], config, rng=rng, return_hidden=True)[:, -1]
    logits = hidden @ params["cls_head"]["kernel"] + params["cls_head"]["bias"]
    nll = -jax.nn.log_softmax(logits)[jnp.arange(logits.shape[0]), batch["labels"]]
    correct = (logits.argmax(-1) == batch["labels"]).sum()
    return nll.sum(), jnp.float32(nll.shape[0]), {"correct": correct}


def test_a_task_with_a_new_head_and_labels_trains_and_accumulates():
    config = CONFIG.replace(drop_rate=0.0)
    params = init_params(config, jax.random.key(7))
    params["cls_head"] = {"kernel": jnp.zeros((config.emb_dim, 3)), "bias": jnp.zeros((3,))}
    x = data(1)[0][0]
    batch = {"tokens": x, "labels": np.arange(8, dtype=np.int32) % 3}
    out = []
    for accum in (1, 2):
        tc = TC.replace(grad_accum=accum, grad_clip=None)
        trainable = r"cls_head/.*|blocks/1/.*"
        state = init_train_state(jax.tree.map(jnp.copy, params), tc, trainable=trainable)
        step = make_train_step(config, tc, task=classify, trainable=trainable)
        state, m = step(state, batch)
        assert float(m["loss"]) == pytest.approx(np.log(3), rel=1e-6)
        assert int(m["correct"]) >= 0 and float(m["count"]) == 8.0
        out.append(state.params)
    for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    sums = make_eval_step(config, task=classify)(out[0], batch)
    assert set(sums) == {"loss_sum", "count", "correct"}


def test_batch_arrays_must_agree_on_the_batch_size():
    params = init_params(CONFIG, jax.random.key(8))
    tc = TC.replace(grad_accum=2)
    state = init_train_state(params, tc)
    x, y = data(1)[0]
    with pytest.raises(ValueError, match="leading"):
        make_train_step(CONFIG, tc)(state, lm_batch(x, y[:6]))


@pytest.mark.parametrize("impl", ["xla", "rowwise"])
def test_a_bad_target_under_jit_makes_the_gradient_nan_too(impl):
    if impl == "rowwise":
        from jaxllm.kernels import mkl

        if not mkl.available():
            pytest.skip("the row-wise kernels need a C++ compiler and MKL's headers")
    for multiple in (1, 64):  # 64: the ids 97..127 are the padded vocabulary's, no targets
        config = CONFIG.replace(drop_rate=0.0, loss_impl=impl, vocab_multiple=multiple)
        assert config.padded_vocab_size == (97 if multiple == 1 else 128)
        check_bad_targets(config, {config.vocab_size, config.padded_vocab_size + 2, -1,
                                   max(config.vocab_size, config.padded_vocab_size - 1)})


def check_bad_targets(config, bad_ids):
    params = init_params(config, jax.random.key(10))
    x = jnp.zeros((2, 8), jnp.int32)
    grad_fn = jax.jit(jax.value_and_grad(lambda p, y, m: lm_loss(p, x, y, config, mask=m)))
    task_grad = jax.jit(jax.grad(lambda p, y: lm_task(p, lm_batch(x, y), config)[0]))
    ones = jnp.ones((2, 8))
    for bad in bad_ids:
        y = jnp.ones((2, 8), jnp.int32).at[0, 3].set(bad)
        loss, g = grad_fn(params, y, ones)
        assert np.isnan(float(loss)) and np.isnan(float(optax.tree.norm(g))), bad
        assert np.isnan(float(optax.tree.norm(task_grad(params, y)))), bad
        # masked out, the same bad target costs nothing: as if it were -100
        loss, g = grad_fn(params, y, ones.at[0, 3].set(0))
        ref_loss, ref_g = grad_fn(params, y.at[0, 3].set(-100), ones)
        np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
        np.testing.assert_allclose(float(optax.tree.norm(g)), float(optax.tree.norm(ref_g)),
                                   rtol=1e-6)


@pytest.mark.parametrize("accum", [1, 2])
def test_a_batch_where_nothing_counts_has_loss_zero(accum):
    config = CONFIG.replace(drop_rate=0.0)
    tc = TC.replace(grad_accum=accum)
    state = init_train_state(init_params(config, jax.random.key(0)), tc)
    x, y = data(1)[0]
    state, m = make_train_step(config, tc)(state, lm_batch(x, np.full_like(y, -100)))
    assert float(m["loss"]) == 0.0 and float(m["count"]) == 0.0 and float(m["grad_norm"]) == 0.0
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(state.params))


def test_a_task_that_breaks_its_contract_is_named():
    config = CONFIG.replace(drop_rate=0.0)
    params = init_params(config, jax.random.key(0))
    x, y = data(1)[0]
    batch = {"tokens": x, "y": y[:, 0].astype(np.float32)}

    def regression(read="y", returns=3, aux=None, scalar=True):
        def task(p, b, c, rng):
            h = jaxllm.apply(p, b["tokens"], c, return_hidden=True).mean(axis=(1, 2))
            err = (h - b[read]) ** 2
            out = (err.sum() if scalar else err, jnp.float32(h.shape[0]), aux)
            return out[:returns]
        return task

    for task, error, message in [
        (regression(read="labels"), ValueError,
         r"the task looked up 'labels', which neither the batch \(keys \['tokens', 'y'\]\) "
         r"nor the parameters' top level"),
        (regression(returns=2), TypeError, r"returns \(loss_sum, count, aux\), got tuple of 2"),
        (regression(aux=[1]), TypeError, "aux is a dict of sums, got list"),
        (regression(scalar=False), ValueError, r"loss_sum and count are scalars .* \(8,\)"),
    ]:
        state = init_train_state(jax.tree.map(jnp.copy, params), TC)
        with pytest.raises(error, match=message):
            make_train_step(config, TC, task=task)(state, batch)
        with pytest.raises(error, match=message):
            make_eval_step(config, task=task)(params, batch)
    state = init_train_state(jax.tree.map(jnp.copy, params), TC)
    _, m = make_train_step(config, TC, task=regression())(state, batch)  # aux None: as {}
    assert np.isfinite(float(m["loss"]))


def test_batches_steps_and_states_that_do_not_fit_are_refused():
    config = CONFIG.replace(drop_rate=0.0)
    params = init_params(config, jax.random.key(0))
    x, y = data(1)[0]
    step = make_train_step(config, TC)
    with pytest.raises(ValueError, match="differ in their leading"):  # grad_accum 1 too
        step(init_train_state(jax.tree.map(jnp.copy, params), TC), lm_batch(x, y[:6]))
    with pytest.raises(ValueError, match="trainable predicate selects no parameter"):
        init_train_state(params, TC, trainable=lambda path, leaf: False)
    subset = make_train_step(config, TC, trainable=r"blocks/1/.*")
    with pytest.raises(ValueError, match="build the state and the step with the same trainable"):
        subset(init_train_state(jax.tree.map(jnp.copy, params), TC), lm_batch(x, y))
