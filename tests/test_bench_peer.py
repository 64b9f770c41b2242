"""The benchmark's PyTorch peer computes what jaxllm computes (issue 23).

The peer in `experiments.bench_train` returns its loss from inside the module and
pads and ties the vocabulary as jaxllm does. On a tiny float32 model, eager torch
on the CPU, its loss and its loss after one AdamW step (clipping
active) must equal jaxllm's to 1e-5. Parameters that start at zero or one
(biases, LayerNorm) are redrawn first, so the checks cannot pass by accident.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from experiments.bench_train import PAD_LOGIT, TorchGPT, make_peer
from jaxllm import GPTConfig, init_params
from jaxllm.train import TrainConfig, init_train_state, make_optimizer, make_train_step

TOL = 1e-5


def tiny(tied: bool, multiple: int) -> GPTConfig:
    return GPTConfig(vocab_size=100, context_length=32, emb_dim=32, n_heads=4, n_layers=2,
                     drop_rate=0.0, qkv_bias=True, tie_embeddings=tied, vocab_multiple=multiple,
                     attn_impl="reference")


def random_params(c: GPTConfig, seed: int = 0):
    """init_params with every leaf perturbed (biases and LayerNorm no longer 0 and 1)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(np.asarray(x) + 0.05 * rng.standard_normal(x.shape),
                                              x.dtype), init_params(c, jax.random.key(seed)))


def batch(c: GPTConfig, b: int = 3, t: int = 32):
    data = np.random.default_rng(0).integers(0, c.vocab_size, size=(b, t + 1))
    return data[:, :-1], data[:, 1:]


@pytest.mark.parametrize("tied,multiple", [(True, 128), (False, 128)])
def test_peer_loss_and_one_adamw_step_match_jaxllm(tied, multiple):
    c = tiny(tied, multiple)
    params = random_params(c)
    x, y = batch(c)
    tc = TrainConfig(lr=1e-2, warmup_steps=0, total_steps=100, grad_clip=0.5, weight_decay=0.1)

    model = TorchGPT(c).load_jaxllm(params, c)
    assert model.tok_emb.weight.shape[0] == c.padded_vocab_size
    assert hasattr(model, "out_head") != tied
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    with torch.no_grad():
        loss = float(model(tx, ty))

    step = make_peer("eager", c, params, tc, "cpu", bf16=False)  # before jaxllm donates params
    optimizer = make_optimizer(tc)
    jstep = make_train_step(c, tc, optimizer)
    state = init_train_state(params, tc, optimizer)
    jbatch = {"tokens": jnp.asarray(x), "targets": jnp.asarray(y)}
    state, m0 = jstep(state, jbatch)
    _, m1 = jstep(state, jbatch)
    assert float(m0["grad_norm"]) > tc.grad_clip  # the clipping is exercised
    assert loss == pytest.approx(float(m0["loss"]), abs=TOL)  # the module's own loss

    t0, t1 = float(step(tx, ty)), float(step(tx, ty))
    assert t0 == pytest.approx(float(m0["loss"]), abs=TOL)
    assert t1 == pytest.approx(float(m1["loss"]), abs=TOL)
    assert t1 < t0 - 1e-2  # the step moved the loss: the second comparison means something


def test_padding_columns_take_no_probability_and_no_gradient():
    c = tiny(True, 128)
    params = random_params(c)
    x, y = batch(c)
    model = TorchGPT(c).load_jaxllm(params, c)
    assert model.vocab_pad[c.vocab_size:].eq(PAD_LOGIT).all()
    assert model.vocab_pad[: c.vocab_size].eq(0).all()
    model(torch.from_numpy(x), torch.from_numpy(y)).backward()
    grad = model.tok_emb.weight.grad
    assert grad[c.vocab_size:].abs().max() == 0  # padding rows: never read, never predicted
    assert grad[: c.vocab_size].abs().max() > 0


@pytest.mark.parametrize("qk_norm", [False, True])
def test_transformers_peer_of_a_llama_family_model_matches_jaxllm(qk_norm):
    """The Llama-style case's peer (LlamaForCausalLM, or Qwen3ForCausalLM with q/k
    norm), from jaxllm's weights: its loss before and after one AdamW step."""
    c = GPTConfig(vocab_size=100, context_length=32, emb_dim=32, n_heads=4, n_kv_heads=2,
                  head_size=12 if qk_norm else None, n_layers=2, ffn_dim=40, norm="rmsnorm",
                  positions="rope", mlp="swiglu", out_bias=False, mlp_bias=False, drop_rate=0.0,
                  qk_norm=qk_norm, tie_embeddings=qk_norm, attn_impl="reference")
    params = random_params(c)
    x, y = batch(c)
    tc = TrainConfig(lr=1e-2, warmup_steps=0, total_steps=100, grad_clip=0.5, weight_decay=0.1)
    step = make_peer("eager", c, params, tc, "cpu", bf16=False)
    optimizer = make_optimizer(tc)
    jstep = make_train_step(c, tc, optimizer)
    state = init_train_state(params, tc, optimizer)
    jbatch = {"tokens": jnp.asarray(x), "targets": jnp.asarray(y)}
    state, m0 = jstep(state, jbatch)
    _, m1 = jstep(state, jbatch)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    t0, t1 = float(step(tx, ty)), float(step(tx, ty))
    assert t0 == pytest.approx(float(m0["loss"]), abs=TOL)
    assert t1 == pytest.approx(float(m1["loss"]), abs=TOL)
    assert t1 < t0 - 1e-2
