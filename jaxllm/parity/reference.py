"""The PyTorch side the parity areas share: random parameters and a
`transformers.GPT2LMHeadModel` holding jaxllm's weights.

Every parameter (biases and LayerNorm scales included) is drawn at random,
so a zero bias or a unit scale hides no mistake.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from jaxllm.config import GPTConfig
from jaxllm.hf import hf_config_kwargs, to_hf_state_dict
from jaxllm.model import init_params

# The Linear/Conv1D weight matrices, which GPT-2's AdamW groups decay.
DECAYED = ("c_attn.weight", "c_proj.weight", "c_fc.weight", "lm_head.weight")


def random_params(config: GPTConfig, seed: int = 0, init=None):
    """A parameter tree of the model's structure (of `init(key)`, by default
    `init_params(config, key)`) with every leaf drawn at random: LayerNorm
    scales 1 + N(0, 0.1), everything else N(0, 0.1), biases included."""
    rng = np.random.default_rng(seed)
    init = init or (lambda key: init_params(config, key))
    shapes = jax.eval_shape(init, jax.random.key(0))

    def draw(path, leaf):
        noise = 0.1 * rng.standard_normal(leaf.shape, dtype=np.float32)
        is_scale = jax.tree_util.keystr(path).endswith("['scale']")
        return jnp.asarray(noise + 1.0 if is_scale else noise)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def random_tokens(config: GPTConfig, shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.vocab_size, size=shape)


def hf_config(config: GPTConfig) -> transformers.GPT2Config:
    """The `transformers` config of `config`, with textbook (eager) attention."""
    return transformers.GPT2Config(**hf_config_kwargs(config), attn_implementation="eager")


def hf_model(params, config: GPTConfig) -> transformers.GPT2LMHeadModel:
    """A PyTorch GPT-2 holding `params` (eval mode, textbook attention)."""
    model = transformers.GPT2LMHeadModel(hf_config(config))
    state = {k: torch.from_numpy(np.array(v)) for k, v in to_hf_state_dict(params, config).items()}
    model.load_state_dict(state, strict=True)
    tied = model.lm_head.weight is model.transformer.wte.weight
    if tied != config.tie_embeddings:
        raise AssertionError(f"transformers tied the head: {tied}, the config: "
                             f"{config.tie_embeddings}")
    return model.eval()


def torch_logits(model, tokens: np.ndarray) -> torch.Tensor:
    return model(torch.from_numpy(np.asarray(tokens))).logits


def leaves_with_paths(tree) -> list[tuple[str, jax.Array]]:
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]
