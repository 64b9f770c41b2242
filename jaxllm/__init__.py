"""jaxllm: a GPT-style language model as pure JAX functions.

The functional API::

    config = jaxllm.GPTConfig(...)            # or jaxllm.GPT_CONFIG_124M, jaxllm.get_preset("small")
    params = jaxllm.init_params(config, key)  # a plain pytree
    logits = jaxllm.forward(params, tokens, config)
    loss = jaxllm.lm_loss(params, inputs, targets, config)  # targets of -100 are ignored
    hidden = jaxllm.apply(params, tokens, config, return_hidden=True)  # after the final LayerNorm
    logits = jaxllm.lm_head(params, hidden, config)  # the head a task may replace
    out = jaxllm.generate(params, config, prompt_ids, max_new_tokens)  # KV-cached decoding
    params, config = jaxllm.load_hf("Qwen/Qwen3-0.6B")  # GPT-2, Llama 3 or Qwen3 weights
    jaxllm.save_hf("out/", params, config)    # a folder transformers loads
"""

from jaxllm import interrupt as _interrupt

_interrupt.install_for_command()  # first, before JAX loads: Ctrl-C never crashes the command

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
from jaxllm.hf import from_hf_state_dict, load_hf, save_hf, save_safetensors, to_hf_state_dict
from jaxllm.checks import IGNORE_INDEX
from jaxllm.loss import cross_entropy, lm_loss, perplexity, token_loss_sum, token_nll
from jaxllm.model import apply, forward, init_params, lm_head

__all__ = [
    "GPT_CONFIG_124M", "PRESETS", "GPTConfig", "count_params", "get_preset", "param_bytes",
    "param_shapes", "from_hf_state_dict", "load_hf", "save_hf", "save_safetensors", "to_hf_state_dict",
    "cross_entropy", "lm_loss", "perplexity", "token_loss_sum", "token_nll", "IGNORE_INDEX",
    "apply", "forward", "init_params", "lm_head",
    "Generation", "generate", "reuse_host_memory", "__version__",
]


def _version() -> str:
    """The installed package's version (pyproject.toml's, the one source); from
    a checkout that was never installed, pyproject.toml itself."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxllm")
    except PackageNotFoundError:
        import re
        from pathlib import Path

        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        found = re.search(r'^version = "([^"]+)"', pyproject.read_text(), re.M) \
            if pyproject.exists() else None
        return found.group(1) if found else "unknown"


__version__ = _version()
