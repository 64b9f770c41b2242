"""jaxllm's GPT-2 against Hugging Face's `GPT2LMHeadModel` in PyTorch.

Every parameter (biases and LayerNorm scales included) is re-randomised, so a
zero bias or a unit scale hides no mistake. Both sides run in float32 on the
same weights: logits, loss, gradient of every parameter, AdamW steps and the
weight conversion itself are compared.
"""

from __future__ import annotations

import math
import platform

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.numpy import save_file

from jaxllm import GPTConfig, count_params, forward, from_hf_state_dict, init_params, lm_loss, to_hf_state_dict
from jaxllm.hf import hf_config_kwargs, save_safetensors
from jaxllm.train.optim import TrainConfig, lr_schedule, make_optimizer

# "mkl" is the native CPU kernel; Intel MKL ships for x86-64 only.
CPU_ATTN_IMPLS = ("reference", "blockwise", "xla") + (
    ("mkl",) if platform.machine() == "x86_64" else ())
BASE = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                 drop_rate=0.0)
LOGIT_ATOL = 1e-5
GRAD_RTOL = 1e-5


def make_config(tie: bool, qkv_bias: bool, attn_impl: str = "reference") -> GPTConfig:
    return BASE.replace(tie_embeddings=tie, qkv_bias=qkv_bias, attn_impl=attn_impl)


def random_params(config: GPTConfig, seed: int = 0):
    """A parameter tree of the model's structure with every leaf drawn at random:
    LayerNorm scales 1 + N(0, 0.1), everything else N(0, 0.1), biases included."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda key: init_params(config, key), jax.random.key(0))

    def draw(path, leaf):
        noise = 0.1 * rng.standard_normal(leaf.shape, dtype=np.float32)
        is_scale = jax.tree_util.keystr(path).endswith("['scale']")
        return jnp.asarray(noise + 1.0 if is_scale else noise)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def hf_model(params, config: GPTConfig) -> transformers.GPT2LMHeadModel:
    """A PyTorch GPT-2 holding `params` (eval mode, textbook attention)."""
    hf_config = transformers.GPT2Config(**hf_config_kwargs(config), attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(hf_config)
    state = {k: torch.from_numpy(v.copy()) for k, v in to_hf_state_dict(params, config).items()}
    model.load_state_dict(state, strict=True)
    assert (model.lm_head.weight is model.transformer.wte.weight) == config.tie_embeddings
    return model.eval()


def random_tokens(config: GPTConfig, shape, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.vocab_size, size=shape)


def torch_logits(model, tokens: np.ndarray) -> torch.Tensor:
    return model(torch.from_numpy(tokens)).logits


def relative_error(ours, theirs) -> float:
    """||ours - theirs|| / ||theirs|| over a whole tensor (Frobenius norms).

    One number per tensor, insensitive to the individual entries that are
    near zero, where an elementwise relative error means nothing.
    """
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.linalg.norm(ours - theirs) / max(np.linalg.norm(theirs), 1e-30))


def leaves_with_paths(tree):
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


# -- logits --------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("qkv_bias", [True, False], ids=["qkv_bias", "no_qkv_bias"])
def test_logits_match_transformers(tie, qkv_bias):
    config = make_config(tie, qkv_bias)
    params = random_params(config, seed=1)
    tokens = random_tokens(config, (3, config.context_length), seed=2)
    with torch.no_grad():
        expected = torch_logits(hf_model(params, config), tokens).numpy()
    assert expected.shape == (3, 16, 97)
    for impl in CPU_ATTN_IMPLS:
        ours = np.asarray(forward(params, tokens, config.replace(attn_impl=impl)))
        assert ours.shape == expected.shape
        err = np.abs(ours - expected).max()
        assert err < LOGIT_ATOL, f"{impl}: max |logit difference| {err:.3g}"


# -- loss and gradients --------------------------------------------------------
def check_loss_and_gradients(config: GPTConfig, seed: int) -> None:
    """lm_loss and its gradient for every parameter against torch autograd."""
    params = random_params(config, seed=seed)
    tokens = random_tokens(config, (2, config.context_length + 1), seed=seed + 1)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    model = hf_model(params, config)
    logits = torch_logits(model, inputs)
    torch_loss = F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(targets).flatten())
    torch_loss.backward()
    torch_grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
    if not config.qkv_bias:
        # HF always has c_attn.bias (zero here); jaxllm has no such parameter.
        for i in range(config.n_layers):
            torch_grads.pop(f"transformer.h.{i}.attn.c_attn.bias")
    # Tied: one torch parameter, whose gradient sums its use as embedding and as head.
    assert ("lm_head.weight" in torch_grads) == (not config.tie_embeddings)
    expected = from_hf_state_dict(torch_grads, config)

    loss, grads = jax.value_and_grad(lm_loss)(params, inputs, targets, config)
    assert abs(float(loss) - torch_loss.item()) < 1e-5
    ours, theirs = leaves_with_paths(grads), leaves_with_paths(expected)
    assert [p for p, _ in ours] == [p for p, _ in theirs]
    assert len(ours) == len(jax.tree.leaves(params))
    for (path, g), (_, t) in zip(ours, theirs):
        assert np.linalg.norm(t) > 0, f"{path}: torch gradient is zero, the test is vacuous"
        err = relative_error(g, t)
        assert err < GRAD_RTOL, f"{config.attn_impl} {path}: relative gradient error {err:.3g}"


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("qkv_bias", [True, False], ids=["qkv_bias", "no_qkv_bias"])
def test_loss_and_every_gradient_match_torch_autograd(tie, qkv_bias):
    check_loss_and_gradients(make_config(tie, qkv_bias), seed=3)


@pytest.mark.parametrize("impl", [i for i in CPU_ATTN_IMPLS if i != "reference"])
def test_gradients_of_each_attention_implementation(impl):
    check_loss_and_gradients(make_config(tie=False, qkv_bias=True, attn_impl=impl), seed=5)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="Intel MKL is x86-64 only")
@pytest.mark.parametrize("matmul_impl", ["mkl", "xla"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_cpu_kernel_recipe_matches_torch(tie, matmul_impl):
    # Every native CPU kernel at once (attention, LayerNorm, the cross-entropy; with
    # MKL products also the bias, GELU and column-sum kernels), as the CPU recipe
    # combines them on Intel (mkl) and other x86 CPUs (xla): logits and every gradient.
    config = make_config(tie, qkv_bias=True, attn_impl="mkl").replace(
        matmul_impl=matmul_impl, norm_impl="mkl", loss_impl="mkl")
    params = random_params(config, seed=8)
    tokens = random_tokens(config, (3, config.context_length), seed=9)
    with torch.no_grad():
        expected = torch_logits(hf_model(params, config), tokens).numpy()
    err = np.abs(np.asarray(forward(params, tokens, config)) - expected).max()
    assert err < LOGIT_ATOL, f"max |logit difference| {err:.3g}"
    check_loss_and_gradients(config, seed=10)


def test_masked_loss_matches_ignore_index():
    config = make_config(tie=False, qkv_bias=True)
    params = random_params(config, seed=5)
    tokens = random_tokens(config, (3, config.context_length + 1), seed=6)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = np.random.default_rng(7).random(targets.shape) < 0.4
    assert 0 < mask.sum() < mask.size

    with torch.no_grad():
        logits = torch_logits(hf_model(params, config), inputs)
    ignored = np.where(mask, targets, -100)
    expected = F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(ignored).flatten(),
                               ignore_index=-100).item()
    unmasked = F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(targets).flatten()).item()
    ours = float(lm_loss(params, inputs, targets, config, mask=mask))
    assert abs(ours - expected) < 1e-5
    assert abs(expected - unmasked) > 1e-3  # the mask really changes the loss
    # A float 0/1 mask is the same as a boolean one.
    assert float(lm_loss(params, inputs, targets, config, mask=mask.astype(np.float32))) == ours


# -- one optimizer, two frameworks -------------------------------------------
def torch_adamw(model, tc: TrainConfig, config: GPTConfig) -> torch.optim.AdamW:
    """torch AdamW with GPT-2's two groups: decay on the Linear/Conv1D weight
    matrices; none on biases, LayerNorm parameters and embedding tables."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not config.qkv_bias and name.endswith("attn.c_attn.bias"):
            p.requires_grad_(False)  # not a parameter of the jaxllm model
            continue
        is_matrix = name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight", "lm_head.weight"))
        (decay if is_matrix else no_decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)


def cosine_lr(tc: TrainConfig, step: int) -> float:
    """The schedule written out (no warmup): cosine from lr to lr * min_lr_ratio."""
    progress = step / tc.total_steps
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_adamw_steps_match_torch(tie):
    config = make_config(tie, qkv_bias=False)
    tc = TrainConfig(lr=3e-3, warmup_steps=0, total_steps=10, weight_decay=0.1, grad_clip=None,
                     beta1=0.9, beta2=0.95, eps=1e-8)
    params = random_params(config, seed=8)
    model = hf_model(params, config)
    torch_opt = torch_adamw(model, tc, config)
    optimizer = make_optimizer(tc)
    opt_state = optimizer.init(params)
    update = jax.jit(optimizer.update)  # one compilation instead of one per leaf shape
    schedule = lr_schedule(tc)
    torch_params = dict(model.named_parameters())
    start = to_hf_state_dict(params, config)

    for step in range(3):
        lr = float(schedule(step))
        assert lr == pytest.approx(cosine_lr(tc, step), rel=1e-6)
        tokens = random_tokens(config, (2, config.context_length + 1), seed=10 + step)
        grads = jax.grad(lm_loss)(params, tokens[:, :-1], tokens[:, 1:], config)
        # Both optimizers get the same gradients, so only the update rules are compared.
        for name, g in to_hf_state_dict(grads, config).items():
            if torch_params.get(name) is not None and torch_params[name].requires_grad:
                torch_params[name].grad = torch.from_numpy(g.copy())
        for group in torch_opt.param_groups:
            group["lr"] = lr
        torch_opt.step()
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)

        ours = to_hf_state_dict(params, config)
        theirs = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        for name, value in ours.items():
            err = np.abs(value - theirs[name]).max()
            assert err < 1e-6, f"step {step} {name}: max |difference| {err:.3g}"
    moved = np.abs(ours["transformer.h.0.mlp.c_fc.weight"] - start["transformer.h.0.mlp.c_fc.weight"])
    assert moved.max() > 1e-3  # the steps did something


def test_weight_decay_is_decoupled_and_masked():
    """With zero gradients Adam's step is 0, so one step shows the decay alone:
    p -= lr * wd * p on the weight matrices, nothing on the rest, as torch does."""
    config = make_config(tie=False, qkv_bias=True)
    tc = TrainConfig(lr=0.05, warmup_steps=0, total_steps=10, weight_decay=0.5, grad_clip=None)
    params = random_params(config, seed=9)
    optimizer = make_optimizer(tc)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(optimizer.update)(zeros, optimizer.init(params), params)
    stepped = optax.apply_updates(params, updates)

    model = hf_model(params, config)
    torch_opt = torch_adamw(model, tc, config)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    torch_opt.step()
    theirs = {k: v.detach().numpy() for k, v in model.state_dict().items()}

    factor = 1 - tc.lr * tc.weight_decay
    before, after = to_hf_state_dict(params, config), to_hf_state_dict(stepped, config)
    for name in before:
        decayed = name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight", "lm_head.weight"))
        want = before[name] * factor if decayed else before[name]
        np.testing.assert_allclose(after[name], want, rtol=1e-6, atol=0, err_msg=name)
        np.testing.assert_allclose(theirs[name], want, rtol=1e-6, atol=0, err_msg=name)


# -- weight conversion ---------------------------------------------------------
def random_hf_state_dict(config: GPTConfig, seed: int) -> dict[str, np.ndarray]:
    """A freshly built PyTorch GPT-2 with every parameter drawn at random."""
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_kwargs(config)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("c_attn.bias") and not config.qkv_bias:
                p.zero_()  # what a model without qkv bias looks like in HF's layout
            else:
                p.normal_(0.0, 0.3)
    return {k: v.numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("qkv_bias", [True, False], ids=["qkv_bias", "no_qkv_bias"])
def test_hf_round_trip_is_exact(tie, qkv_bias, tmp_path):
    config = make_config(tie, qkv_bias)
    original = random_hf_state_dict(config, seed=11)
    assert np.array_equal(original["lm_head.weight"], original["transformer.wte.weight"]) == tie

    params = from_hf_state_dict(original, config)
    back = to_hf_state_dict(params, config)
    assert sorted(back) == sorted(original)
    for name, value in original.items():
        assert back[name].dtype == np.float32 and back[name].shape == value.shape, name
        assert np.array_equal(back[name], value), f"{name} changed in the round trip"

    # The same weights from a safetensors file (safetensors wants no shared tensors).
    path = tmp_path / "model.safetensors"
    save_file({k: v.copy() for k, v in original.items()}, str(path))
    for source in (path, str(path), tmp_path):  # a path, a string, a directory
        from_file = from_hf_state_dict(source, config)
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), from_file, params))

    # jaxllm's own safetensors writer loads back into PyTorch unchanged.
    save_safetensors(params, config, tmp_path / "ours.safetensors")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_kwargs(config)))
    from safetensors.torch import load_file
    model.load_state_dict(load_file(str(tmp_path / "ours.safetensors")), strict=True)
    # Same parameter count, but for the zero c_attn.bias HF keeps when jaxllm has none.
    hf_extra = 0 if qkv_bias else config.n_layers * 3 * config.emb_dim
    assert model.num_parameters() == count_params(config) + hf_extra
    for name, value in model.state_dict().items():
        assert np.array_equal(value.numpy(), original[name]), name


def test_missing_safetensors_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        from_hf_state_dict(tmp_path / "nothing.safetensors", BASE)
