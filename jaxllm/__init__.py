"""jaxllm: a GPT-style language model as pure JAX functions.

The functional API::

    config = jaxllm.GPTConfig(...)            # or jaxllm.GPT_CONFIG_124M, jaxllm.get_preset("small")
    params = jaxllm.init_params(config, key)  # a plain pytree
    logits = jaxllm.forward(params, tokens, config)
    loss = jaxllm.lm_loss(params, inputs, targets, config)
    out = jaxllm.generate(params, config, prompt_ids, max_new_tokens)  # KV-cached decoding
"""

from jaxllm.config import (
    GPT_CONFIG_124M,
    PRESETS,
    GPTConfig,
    count_params,
    get_preset,
    param_bytes,
    param_shapes,
)
from jaxllm.generate import Generation, generate
from jaxllm.host_memory import reuse_host_memory
from jaxllm.hf import from_hf_state_dict, save_safetensors, to_hf_state_dict
from jaxllm.loss import cross_entropy, lm_loss, perplexity
from jaxllm.model import apply, forward, init_params

__all__ = [
    "GPT_CONFIG_124M", "PRESETS", "GPTConfig", "count_params", "get_preset", "param_bytes",
    "param_shapes", "from_hf_state_dict", "save_safetensors", "to_hf_state_dict",
    "cross_entropy", "lm_loss", "perplexity", "apply", "forward", "init_params",
    "Generation", "generate", "reuse_host_memory",
]
