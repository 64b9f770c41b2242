"""Llama 3 and Qwen3 against `transformers`' LlamaForCausalLM and Qwen3ForCausalLM
on tiny random float32 models: logits, loss, every gradient, KV-cached greedy
decoding, and weights written by `save_hf` read back by transformers.

The Llama model has Llama 3's RoPE scaling with a short original context (16)
that decoding runs past; the Qwen3 model has head_dim * heads != hidden size,
grouped-query attention and a tied head. Norm scales are re-randomised so no
comparison passes on ones.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import jax
import numpy as np
import torch
import transformers

from jaxllm.generate import generate
from jaxllm.hf import config_from_hf, from_hf_state_dict, load_hf, save_hf, to_hf_state_dict
from jaxllm.loss import lm_loss
from jaxllm.model import apply
from jaxllm.parity import Comparison, close, exact, register, require

LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rms_norm_eps=1e-5, tie_word_embeddings=False,
             rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 16},
             bos_token_id=None, eos_token_id=None, pad_token_id=None)
QWEN3 = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=12,
             max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True,
             rope_parameters={"rope_type": "default", "rope_theta": 1000.0},
             bos_token_id=None, eos_token_id=None, pad_token_id=None)
TOKENS = np.random.default_rng(0).integers(0, 96, size=(2, 24))
ATOL = RTOL = 1e-5


def hf_model(kind: str):
    """A tiny random transformers model of the family (eager attention, float32)."""
    torch.manual_seed(0)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA))
    elif kind == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**QWEN3))
    else:
        raise ValueError(f"no tiny {kind!r} model: choose llama or qwen3")
    model.config._attn_implementation = "eager"
    with torch.no_grad():  # norm scales away from 1, so a missed norm cannot pass
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model.float().eval()


def pair(kind: str):
    """(transformers model, jaxllm params, config) of one tiny random model."""
    model = hf_model(kind)
    config = config_from_hf(model.config.to_dict())
    return model, from_hf_state_dict(model.state_dict(), config), config


@register("Qwen3: logits, loss and every gradient", kind="qwen3")
@register("Llama 3: logits, loss and every gradient", kind="llama")
def logits_loss_gradients(kind: str) -> list[Comparison]:
    """Logits, loss and the gradient of every parameter against transformers' autograd."""
    model, params, config = pair(kind)
    ids = torch.tensor(TOKENS)
    out = model(ids, labels=ids)
    out.loss.backward()
    loss, grads = jax.value_and_grad(
        lambda p: lm_loss(p, TOKENS[:, :-1], TOKENS[:, 1:], config))(params)
    ours = to_hf_state_dict(grads, config)
    named = dict(model.named_parameters())
    require(set(named) <= set(ours), f"no gradient for {sorted(set(named) - set(ours))}")
    return [close("logits", (np.asarray(apply(params, TOKENS, config)),
                             out.logits.detach().numpy()), atol=ATOL, rtol=RTOL),
            close("loss", (float(loss), out.loss.item()), atol=ATOL, rtol=RTOL),
            close("gradient of every parameter",
                  {name: (ours[name], p.grad.numpy()) for name, p in named.items()},
                  atol=ATOL, rtol=RTOL)]


@register("Qwen3: greedy tokens vs generate()", kind="qwen3")
@register("Llama 3: greedy tokens vs generate()", kind="llama")
def greedy_tokens(kind: str) -> list[Comparison]:
    """KV-cached greedy decoding against transformers' generate: 30 tokens, past
    the Llama model's original RoPE context."""
    model, params, config = pair(kind)
    prompt = TOKENS[:, :8]
    theirs = model.generate(torch.tensor(prompt), max_new_tokens=30, min_new_tokens=30,
                            do_sample=False, attention_mask=torch.ones_like(torch.tensor(prompt)))
    ours = generate(params, config, prompt, 30)
    return [exact("30 greedy tokens (ids) after an 8-token prompt",
                  (np.asarray(ours.tokens), theirs[:, 8:].numpy()))]


@register("Qwen3: save_hf read back by transformers and load_hf", kind="qwen3")
@register("Llama 3: save_hf read back by transformers and load_hf", kind="llama")
def save_hf_round_trip(kind: str, folder: Path | None = None) -> list[Comparison]:
    """save_hf's folder read back by transformers (logits) and by load_hf (weights, exact)."""
    if folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            return save_hf_round_trip(kind, Path(tmp))
    model, params, config = pair(kind)
    save_hf(folder, params, config)
    transformers.logging.disable_progress_bar()  # no loading bar in the report's output
    try:
        back = transformers.AutoModelForCausalLM.from_pretrained(folder,
                                                                 attn_implementation="eager")
    finally:
        transformers.logging.enable_progress_bar()
    require(type(back) is type(model), f"transformers read a {type(back).__name__}")
    with torch.no_grad():
        logits = back.float()(torch.tensor(TOKENS)).logits.numpy()
    params2, config2 = load_hf(folder)
    require(config2 == config, "load_hf read another config than save_hf wrote")
    return [close("transformers' logits from save_hf's folder",
                  (logits, np.asarray(apply(params, TOKENS, config))), atol=ATOL, rtol=RTOL),
            exact("load_hf(save_hf(params))",
                  {jax.tree_util.keystr(p): (a, b) for (p, a), b in zip(
                      jax.tree_util.tree_leaves_with_path(params2), jax.tree.leaves(params))})]
