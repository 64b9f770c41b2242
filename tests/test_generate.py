"""Generation with a key-value cache against the uncached loop, PyTorch and itself.

The tests share one tiny config and a few call shapes, so that the jitted
prefill and decode compile only a handful of times for the whole file.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import jaxllm
from jaxllm.generate import (TRACE_COUNTS, generate, generate_simple, generate_stream,
                             prompt_bucket, top_p_filter)
from jaxllm.parity import assert_passed, gpt2 as gpt2_parity

# vocab_multiple pads the embedding to 128 rows: no padded id may ever come out
CFG = jaxllm.GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2,
                       drop_rate=0.0, vocab_multiple=64)
PROMPTS = [[5, 17, 3], [40, 2, 9, 11, 60, 7]]


@pytest.fixture(scope="module")
def params():
    return jaxllm.init_params(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def batch_greedy(params):
    """Greedy tokens and logits for PROMPTS, 12 new tokens, cached."""
    return generate(params, CFG, PROMPTS, 12, return_logits=True)


def test_cached_equals_uncached_greedy(params, batch_greedy):
    ref = generate_simple(params, CFG, PROMPTS, 12)
    np.testing.assert_array_equal(batch_greedy.tokens, ref.tokens)
    np.testing.assert_allclose(batch_greedy.logits, ref.logits, atol=1e-5, rtol=0)
    assert batch_greedy.tokens.shape == (2, 12) and batch_greedy.logits.shape == (2, 12, 97)
    np.testing.assert_array_equal(batch_greedy.lengths, [12, 12])
    # the logits are those the tokens were chosen from
    np.testing.assert_array_equal(batch_greedy.logits.argmax(-1), batch_greedy.tokens)


def test_batch_of_different_lengths_equals_each_prompt_alone(params, batch_greedy):
    for i, prompt in enumerate(PROMPTS):
        alone = generate(params, CFG, prompt, 12, return_logits=True)
        np.testing.assert_array_equal(alone.tokens[0], batch_greedy.tokens[i])
        np.testing.assert_allclose(alone.logits[0], batch_greedy.logits[i], atol=1e-5, rtol=0)
    # a right-padded 2-D array with lengths is the same request
    padded = np.zeros((2, 6), np.int32)
    padded[0, :3], padded[1] = PROMPTS[0], PROMPTS[1]
    again = generate(params, CFG, padded, 12, lengths=[3, 6], return_logits=True)
    np.testing.assert_array_equal(again.tokens, batch_greedy.tokens)


def test_sliding_past_the_context_matches_the_cropping_loop(params):
    long_prompt = [int(t) for t in np.random.default_rng(0).integers(0, 97, size=40)]
    prompts = [long_prompt, PROMPTS[0]]  # one starts past the context, one reaches it later
    n = 36  # 3 + 36 - 1 > 32: both sequences slide
    cached = generate(params, CFG, prompts, n, return_logits=True)
    ref = generate_simple(params, CFG, prompts, n)
    np.testing.assert_array_equal(cached.tokens, ref.tokens)
    np.testing.assert_allclose(cached.logits, ref.logits, atol=1e-5, rtol=0)


def test_no_sliding_is_an_error_past_the_context(params):
    with pytest.raises(ValueError, match="allow_slide=False"):
        generate(params, CFG, list(range(33)), 1, allow_slide=False)
    with pytest.raises(ValueError, match=r"max_new_tokens \(31\).*context length 32"):
        generate(params, CFG, [1, 2, 3], 31, allow_slide=False)
    # exactly filling the context is allowed: 3 + 30 - 1 = 32 tokens fed
    out = generate(params, CFG, [[1, 2, 3]], 30, allow_slide=False, return_logits=True)
    assert out.tokens.shape == (1, 30)


def test_no_recompilation_within_a_bucket_or_across_max_new_tokens(params):
    # compile (if no test did yet) the prefill, the decode and the sliding-window refresh
    generate(params, CFG, [1, 2, 3], 40, return_logits=True)
    before = dict(TRACE_COUNTS)
    assert before["refresh"] >= 1
    for length, n in ((3, 7), (5, 20), (9, 1), (16, 70), (12, 33)):
        generate(params, CFG, list(range(1, length + 1)), n, return_logits=True)
    assert dict(TRACE_COUNTS) == before
    # a prompt in the next bucket compiles a new prefill, and only that
    assert prompt_bucket(17, CFG.context_length) == 32
    generate(params, CFG, list(range(1, 18)), 5, return_logits=True)
    assert TRACE_COUNTS["prefill"] == before["prefill"] + 1
    assert TRACE_COUNTS["decode"] == before["decode"]


def test_sampling_is_reproducible_and_matches_the_uncached_loop(params):
    kw = dict(temperature=0.9, top_k=20, top_p=0.95)
    a = generate(params, CFG, PROMPTS[1], 16, rng=jax.random.PRNGKey(1), **kw)
    b = generate(params, CFG, PROMPTS[1], 16, rng=jax.random.PRNGKey(1), **kw)
    c = generate(params, CFG, PROMPTS[1], 16, rng=jax.random.PRNGKey(2), **kw)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    ref = generate_simple(params, CFG, PROMPTS[1], 16, rng=jax.random.PRNGKey(1), **kw)
    np.testing.assert_array_equal(a.tokens, ref.tokens)


def test_top_k_1_is_greedy(params):
    greedy = generate(params, CFG, PROMPTS[1], 12, return_logits=True)
    # top_k=1 leaves one token, whatever the temperature and top_p
    sampled = generate(params, CFG, PROMPTS[1], 12, rng=jax.random.PRNGKey(3), temperature=1.5,
                       top_k=1, top_p=0.95)
    np.testing.assert_array_equal(sampled.tokens, greedy.tokens)


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: np.isfinite(np.asarray(top_p_filter(logits, p)))[0].tolist()
    assert kept(0.8) == [True, True, False, False]
    assert kept(0.81) == [True, True, True, False]
    assert kept(0.4) == [True, False, False, False]
    assert kept(1.0) == [True, True, True, True]
    # the order of the vocabulary does not matter
    shuffled = jnp.log(jnp.array([[0.15, 0.05, 0.5, 0.3]]))
    assert np.isfinite(np.asarray(top_p_filter(shuffled, 0.8)))[0].tolist() == \
        [False, False, True, True]


def test_eos_stops_each_sequence(params, batch_greedy):
    free = batch_greedy.tokens
    # an eos id that each row produces for the first time at a different step
    eos, stops = None, None
    for candidate in np.unique(free):
        first = [int(np.argmax(row == candidate)) if (row == candidate).any() else None
                 for row in free]
        if None not in first and first[0] != first[1]:
            eos, stops = int(candidate), first
            break
    assert eos is not None, "no usable eos candidate in the greedy output"
    out = generate(params, CFG, PROMPTS, 12, eos_id=eos, chunk_size=4, return_logits=True)
    for row, stop in enumerate(stops):
        np.testing.assert_array_equal(out.tokens[row, : stop + 1], free[row, : stop + 1])
        assert (out.tokens[row, stop + 1:] == eos).all()
        assert out.lengths[row] == stop + 1
    # streaming stops right after the step in which the last sequence finished
    chunks = list(generate_stream(params, CFG, PROMPTS, 12, eos_id=eos, chunk_size=4,
                                  return_logits=True))
    streamed = np.concatenate([t for t, _ in chunks], 1)
    assert len(chunks) == max(stops) // 4 + 1
    assert streamed.shape[1] == max(stops) + 1
    np.testing.assert_array_equal(streamed, out.tokens[:, : max(stops) + 1])
    ref = generate_simple(params, CFG, PROMPTS, 12, eos_id=eos)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)


def test_padded_vocabulary_is_never_sampled(params):
    assert CFG.padded_vocab_size == 128
    p = dict(params)
    # make the padding rows the most likely by far, were they not masked
    p["out_head"] = {"kernel": params["out_head"]["kernel"].at[:, CFG.vocab_size:].set(5.0)}
    # top_k above the vocabulary and top_p=1 filter nothing out
    out = generate(p, CFG, PROMPTS[0], 40, rng=jax.random.PRNGKey(0), temperature=3.0,
                   top_k=1000, top_p=1.0)
    assert out.tokens.max() < CFG.vocab_size
    assert len(np.unique(out.tokens)) > 10  # it really sampled over the vocabulary


def test_greedy_matches_transformers_generate(params):
    assert gpt2_parity.GENERATE_CONFIG == CFG
    (tokens,) = assert_passed(gpt2_parity.greedy_tokens(params, PROMPTS[1], 12))
    assert tokens.tolerance == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_tokens=[]), "empty"),
    (dict(prompt_tokens=[[1, 2], []]), "prompt 1 is empty"),
    (dict(prompt_tokens=[1, 97]), "id 97, outside"),
    (dict(prompt_tokens=[[1], [-1]]), "id -1, outside"),
    (dict(prompt_tokens=[1.5, 2.0]), "integer"),
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an int"),
    (dict(top_p=0.0, temperature=1.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5, temperature=1.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=float("nan"), temperature=1.0), r"top_p must be in \(0, 1\]"),
    (dict(top_k=0, temperature=1.0), "top_k must be an int >= 1"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=0.7, rng=None), "needs an rng key"),
    (dict(eos_id=97), "eos_id 97 is outside"),
    (dict(lengths=[5]), r"lengths\[0\] = 5 is outside"),
    (dict(chunk_size=0), "chunk_size must be an int >= 1"),
])
def test_bad_input_is_a_clear_value_error(params, kwargs, match):
    args = dict(prompt_tokens=[1, 2, 3], max_new_tokens=4, rng=jax.random.PRNGKey(0))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(params, CFG, **args)
