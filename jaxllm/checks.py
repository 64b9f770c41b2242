"""Checks at the API boundary, where arrays are still concrete.

Under `jax.jit` JAX clamps an out-of-range index silently, so token ids and
targets are checked before they are traced.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import GPTConfig

# The target id that marks a position out of the loss, as in PyTorch's
# `cross_entropy(ignore_index=-100)` and every fine-tuning recipe built on it.
IGNORE_INDEX = -100


def check_tokens(tokens, config: GPTConfig, *, name: str = "tokens", max_len: int | None = None,
                 allow_ignore: bool = False):
    """Validate a token array at the API boundary and return it as a JAX array.

    Checks dtype (integer), rank (1 or 2), length (<= context_length, or
    `max_len`) and, when the values are concrete, the range [0, vocab_size);
    with `allow_ignore` (targets) `IGNORE_INDEX` is allowed too.
    """
    if not hasattr(tokens, "dtype"):  # a list, tuple or Python scalar
        tokens = np.asarray(tokens)
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{name} must be integer token ids, got dtype {tokens.dtype}")
    if tokens.ndim not in (1, 2):
        raise ValueError(f"{name} must have shape (seq,) or (batch, seq), got {tokens.shape}")
    limit = config.context_length if max_len is None else max_len
    if tokens.shape[-1] > limit:
        raise ValueError(
            f"{name} has length {tokens.shape[-1]}, longer than the context length {limit}")
    if tokens.size == 0:
        raise ValueError(f"{name} is empty (shape {tokens.shape})")
    if not isinstance(tokens, jax.core.Tracer):
        arr = np.asarray(tokens)
        if allow_ignore:
            arr = arr[arr != IGNORE_INDEX]
            if arr.size == 0:
                return jnp.asarray(tokens)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= config.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{name} contains id {bad}, outside [0, {config.vocab_size}) (vocab_size)"
                + (f" and not the ignore label {IGNORE_INDEX}" if allow_ignore else ""))
    return jnp.asarray(tokens)
