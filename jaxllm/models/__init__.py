"""The model families. Each module holds only what its family computes
differently: `init_params`, `embed`, `norm`, `attention` and `mlp`;
`jaxllm.model` runs them all through one block, one residual stream, one
`lm_head` and one `apply`.

- `gpt2`: GPT-2 (learned positions, LayerNorm, packed qkv with biases, GELU).
- `llama`: Llama 3 and Qwen3 (RoPE, RMSNorm, separate q/k/v/o projections
  with grouped-query attention and optional q/k norm, SwiGLU).
"""

from __future__ import annotations

from types import ModuleType

from jaxllm.config import GPTConfig
from jaxllm.models import gpt2, llama

FAMILIES: dict[str, ModuleType] = {"gpt2": gpt2, "llama": llama}


def family(config: GPTConfig) -> ModuleType:
    """The module that builds and runs `config`'s model (`GPTConfig.family`)."""
    return FAMILIES[config.family]
