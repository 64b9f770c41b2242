"""The text sampler used during training (a layer over `jaxllm.generate`)."""

import jax
import numpy as np
import pytest

from jaxllm.config import GPTConfig
from jaxllm.model import forward, init_params
from jaxllm.tokenizer import ByteTokenizer
from jaxllm.train.sampling import sample_text

CONFIG = GPTConfig(vocab_size=257, context_length=16, emb_dim=32, n_heads=2, n_layers=1,
                   drop_rate=0.0)
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(1))


def test_greedy_matches_naive_argmax_with_cropped_context(params):
    prompt = "abcdefghijkl"
    text = sample_text(params, CONFIG, TOK, prompt, 8)  # 20 tokens > context 16: crops
    last_logits = jax.jit(lambda p, ids: forward(p, ids, CONFIG)[-1])
    ids = TOK.encode(prompt)
    for _ in range(8):
        ids.append(int(np.argmax(last_logits(params, np.asarray(ids[-CONFIG.context_length:])))))
    assert text == TOK.decode(ids)
    assert text.startswith(prompt)


def test_temperature_sampling_is_seeded(params):
    key = jax.random.key(7)
    a = sample_text(params, CONFIG, TOK, "x", 10, temperature=1.0, key=key)
    assert a == sample_text(params, CONFIG, TOK, "x", 10, temperature=1.0, key=key)
    assert a != sample_text(params, CONFIG, TOK, "x", 10, temperature=1.0, key=jax.random.key(8))
    top1 = sample_text(params, CONFIG, TOK, "x", 10, temperature=1.0, top_k=1, key=key)
    assert top1 == sample_text(params, CONFIG, TOK, "x", 10)  # top-1 is greedy
    assert isinstance(sample_text(params, CONFIG, TOK, "", 3), str)  # starts from end-of-text


def test_bad_arguments(params):
    with pytest.raises(ValueError, match="needs a PRNG key"):
        sample_text(params, CONFIG, TOK, "x", 2, temperature=0.5)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        sample_text(params, CONFIG, TOK, "x", 2, temperature=-1.0)
