"""Text samples for watching a model learn: a prompt in, decoded text out.

A thin layer over `jaxllm.generate` (KV-cached, sliding past the context
like the classic loop that crops it) that speaks text instead of token ids.
"""

from __future__ import annotations

import jax

from jaxllm.config import GPTConfig
from jaxllm.generate import generate
from jaxllm.tokenizer import Tokenizer


def sample_text(params, config: GPTConfig, tokenizer: Tokenizer, prompt: str,
                max_new_tokens: int = 50, *, temperature: float = 0.0, top_k: int | None = None,
                key: jax.Array | None = None) -> str:
    """The prompt followed by `max_new_tokens` sampled tokens, decoded.

    `temperature` 0 is greedy decoding; above 0 it samples from the softmax of
    logits / temperature (restricted to the `top_k` largest when given), which
    needs `key`. An empty prompt starts from the end-of-text token.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if temperature > 0 and key is None:
        raise ValueError("sampling with temperature > 0 needs a PRNG key")
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    out = generate(params, config, ids, max_new_tokens, rng=key, temperature=temperature,
                   top_k=top_k)
    return prompt + tokenizer.decode(out.tokens[0].tolist())
