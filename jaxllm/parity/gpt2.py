"""GPT-2 against `transformers.GPT2LMHeadModel`: logits, loss, every gradient,
AdamW steps, weight decay, greedy tokens and the weight conversion.

Both sides run in float32 on the same random weights (`reference.random_params`).
"""

from __future__ import annotations

import math
import platform
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as F
import transformers
from safetensors.numpy import save_file

from jaxllm.config import GPTConfig, count_params
from jaxllm.generate import generate
from jaxllm.hf import from_hf_state_dict, hf_config_kwargs, save_safetensors, to_hf_state_dict
from jaxllm.loss import lm_loss
from jaxllm.model import forward, init_params
from jaxllm.parity import Comparison, close, exact, register, relative, require, within
from jaxllm.parity.reference import (DECAYED, hf_model, leaves_with_paths, random_params,
                                     random_tokens, torch_logits)
from jaxllm.train.optim import TrainConfig, lr_schedule, make_optimizer

# "mkl" is the native CPU kernel; Intel MKL ships for x86-64 only.
ON_X86 = platform.machine() == "x86_64"
CPU_ATTN_IMPLS = ("reference", "blockwise", "xla") + (("mkl",) if ON_X86 else ())
BASE = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                 drop_rate=0.0)
LOGIT_ATOL = 1e-5
LOSS_ATOL = 1e-5
GRAD_RTOL = 1e-5
ADAMW_ATOL = 1e-6


def make_config(tie: bool, qkv_bias: bool, attn_impl: str = "reference") -> GPTConfig:
    return BASE.replace(tie_embeddings=tie, qkv_bias=qkv_bias, attn_impl=attn_impl)


def _variant(tie: bool, qkv_bias: bool) -> str:
    return f"{'tied' if tie else 'untied'}, {'qkv bias' if qkv_bias else 'no qkv bias'}"


# -- logits ----------------------------------------------------------------------
def logit_comparisons(config: GPTConfig, seed: int, impls=None) -> list[Comparison]:
    """`forward` under each attention implementation against GPT2LMHeadModel's logits."""
    params = random_params(config, seed=seed)
    tokens = random_tokens(config, (3, config.context_length), seed=seed + 1)
    with torch.no_grad():
        expected = torch_logits(hf_model(params, config), tokens).numpy()
    require(expected.shape == (3, config.context_length, config.vocab_size),
            f"transformers' logits have shape {expected.shape}")
    out = []
    for impl in impls or (config.attn_impl,):
        ours = np.asarray(forward(params, tokens, config.replace(attn_impl=impl)))
        out.append(within(f"logits ({impl} attention)", (ours, expected), LOGIT_ATOL))
    return out


def logits(tie: bool, qkv_bias: bool, impls=CPU_ATTN_IMPLS) -> list[Comparison]:
    """Logits of every CPU attention implementation against transformers."""
    return logit_comparisons(make_config(tie, qkv_bias), seed=1, impls=impls)


# -- loss and gradients --------------------------------------------------------------
def loss_and_gradients(config: GPTConfig, seed: int) -> list[Comparison]:
    """lm_loss and its gradient for every parameter against torch autograd."""
    params = random_params(config, seed=seed)
    tokens = random_tokens(config, (2, config.context_length + 1), seed=seed + 1)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    model = hf_model(params, config)
    torch_loss = F.cross_entropy(torch_logits(model, inputs).flatten(0, 1),
                                 torch.from_numpy(targets).flatten())
    torch_loss.backward()
    torch_grads = {n: p.grad.numpy() for n, p in model.named_parameters()}
    if not config.qkv_bias:
        # HF always has c_attn.bias (zero here); jaxllm has no such parameter.
        for i in range(config.n_layers):
            torch_grads.pop(f"transformer.h.{i}.attn.c_attn.bias")
    # Tied: one torch parameter, whose gradient sums its use as embedding and as head.
    require(("lm_head.weight" in torch_grads) == (not config.tie_embeddings),
            "transformers' head is tied differently from the config")
    expected = from_hf_state_dict(torch_grads, config)

    loss, grads = jax.value_and_grad(lm_loss)(params, inputs, targets, config)
    ours, theirs = leaves_with_paths(grads), leaves_with_paths(expected)
    require([p for p, _ in ours] == [p for p, _ in theirs],
            "the gradient trees name different parameters")
    require(len(ours) == len(jax.tree.leaves(params)), "a parameter has no gradient")
    for path, t in theirs:
        require(np.linalg.norm(t) > 0, f"{path}: torch gradient is zero, the check is vacuous")
    return [within(f"loss ({config.attn_impl} attention)", (float(loss), torch_loss.item()),
                   LOSS_ATOL),
            relative(f"gradient of every parameter ({config.attn_impl} attention)",
                     {path: (g, t) for (path, g), (_, t) in zip(ours, theirs)}, GRAD_RTOL)]


def gradients(tie: bool, qkv_bias: bool, attn_impl: str = "reference", seed: int = 3
              ) -> list[Comparison]:
    return loss_and_gradients(make_config(tie, qkv_bias, attn_impl), seed=seed)


def cpu_kernel_recipe(tie: bool, matmul_impl: str) -> list[Comparison]:
    """Every native CPU kernel at once (attention, LayerNorm, the cross-entropy; with
    MKL products also the bias, GELU and column-sum kernels), as the CPU recipe
    combines them on Intel (mkl) and other x86 CPUs (xla): logits and every gradient."""
    config = make_config(tie, qkv_bias=True, attn_impl="mkl").replace(
        matmul_impl=matmul_impl, norm_impl="mkl", loss_impl="mkl")
    return logit_comparisons(config, seed=8) + loss_and_gradients(config, seed=10)


def masked_loss() -> list[Comparison]:
    """lm_loss with a 0/1 mask, and with targets of -100, against cross_entropy's
    ignore_index=-100 (one row ignored whole)."""
    config = make_config(tie=False, qkv_bias=True)
    params = random_params(config, seed=5)
    tokens = random_tokens(config, (3, config.context_length + 1), seed=6)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    mask = np.random.default_rng(7).random(targets.shape) < 0.4
    mask[1] = False
    require(0 < mask.sum() < mask.size, "the mask keeps all or nothing")

    with torch.no_grad():
        logits_t = torch_logits(hf_model(params, config), inputs).flatten(0, 1)
    ignored = np.where(mask, targets, -100)
    expected = F.cross_entropy(logits_t, torch.from_numpy(ignored).flatten(),
                               ignore_index=-100).item()
    unmasked = F.cross_entropy(logits_t, torch.from_numpy(targets).flatten()).item()
    require(abs(expected - unmasked) > 1e-3, "the mask does not change the loss")
    ours = float(lm_loss(params, inputs, targets, config, mask=mask))
    as_float = float(lm_loss(params, inputs, targets, config, mask=mask.astype(np.float32)))
    as_ignored = float(lm_loss(params, inputs, ignored, config))
    return [within("masked loss vs ignore_index=-100", (ours, expected), LOSS_ATOL),
            close("loss over targets of -100 vs ignore_index=-100", (as_ignored, expected),
                  atol=0.0, rtol=1e-6),
            exact("float 0/1 mask vs boolean mask", (as_float, ours))]


# -- one optimizer, two frameworks -------------------------------------------------
def torch_adamw(model, tc: TrainConfig, config: GPTConfig) -> torch.optim.AdamW:
    """torch AdamW with GPT-2's two groups: decay on the Linear/Conv1D weight
    matrices; none on biases, LayerNorm parameters and embedding tables."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not config.qkv_bias and name.endswith("attn.c_attn.bias"):
            p.requires_grad_(False)  # not a parameter of the jaxllm model
            continue
        (decay if name.endswith(DECAYED) else no_decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)


def cosine_lr(tc: TrainConfig, step: int) -> float:
    """The schedule written out (no warmup): cosine from lr to lr * min_lr_ratio."""
    progress = step / tc.total_steps
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw_steps(tie: bool, steps: int = 3) -> list[Comparison]:
    """jaxllm's optimizer and torch.optim.AdamW fed the same gradients: every weight after each step."""
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

    rates, weights = {}, {}
    for step in range(steps):
        lr = float(schedule(step))
        rates[f"step {step}"] = (lr, cosine_lr(tc, step))
        tokens = random_tokens(config, (2, config.context_length + 1), seed=10 + step)
        grads = jax.grad(lm_loss)(params, tokens[:, :-1], tokens[:, 1:], config)
        # Both optimizers get the same gradients, so only the update rules are compared.
        for name, g in to_hf_state_dict(grads, config).items():
            if torch_params.get(name) is not None and torch_params[name].requires_grad:
                torch_params[name].grad = torch.from_numpy(np.array(g))
        for group in torch_opt.param_groups:
            group["lr"] = lr
        torch_opt.step()
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)

        ours = to_hf_state_dict(params, config)
        theirs = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
        weights.update({f"step {step} {name}": (value, theirs[name])
                        for name, value in ours.items()})
    name = "transformer.h.0.mlp.c_fc.weight"
    require(np.abs(ours[name] - start[name]).max() > 1e-3, "the steps moved nothing")
    return [close("learning rate vs the cosine written out", rates, atol=1e-12, rtol=1e-6),
            within(f"every weight after each of {steps} AdamW steps", weights, ADAMW_ATOL)]


def weight_decay() -> list[Comparison]:
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
    want = {name: before[name] * factor if name.endswith(DECAYED) else before[name]
            for name in before}
    return [close("jaxllm: one decay step", {n: (after[n], want[n]) for n in want},
                  atol=0.0, rtol=1e-6),
            close("torch: one decay step", {n: (theirs[n], want[n]) for n in want},
                  atol=0.0, rtol=1e-6)]


# -- generation ----------------------------------------------------------------------
GENERATE_CONFIG = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4,
                            n_layers=2, drop_rate=0.0, vocab_multiple=64)


def greedy_tokens(params=None, prompt=(40, 2, 9, 11, 60, 7), max_new_tokens: int = 12
                  ) -> list[Comparison]:
    """`generate` (KV cache) against `GPT2LMHeadModel.generate`, greedy (do_sample=False)."""
    config = GENERATE_CONFIG
    if params is None:
        params = init_params(config, jax.random.PRNGKey(0))
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_kwargs(config)))
    sd = {k: torch.tensor(np.asarray(v)) for k, v in to_hf_state_dict(params, config).items()}
    model.load_state_dict(sd, strict=False)
    model.eval()
    prompt = list(prompt)
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(
            1, len(prompt), dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=None, pad_token_id=0)
    theirs = hf[0, len(prompt):].numpy()
    ours = np.asarray(generate(params, config, prompt, max_new_tokens).tokens[0])
    require(len(theirs) == max_new_tokens, f"transformers generated {len(theirs)} tokens")
    return [exact(f"{max_new_tokens} greedy tokens (ids)", (ours, theirs))]


# -- weight conversion ----------------------------------------------------------------
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


def hf_round_trip(tie: bool, qkv_bias: bool, folder: Path | None = None) -> list[Comparison]:
    """transformers' weights -> jaxllm -> transformers, directly and through
    safetensors files (theirs read by jaxllm, jaxllm's read by transformers): exact."""
    if folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            return hf_round_trip(tie, qkv_bias, Path(tmp))
    folder = Path(folder)
    config = make_config(tie, qkv_bias)
    original = random_hf_state_dict(config, seed=11)
    require(np.array_equal(original["lm_head.weight"], original["transformer.wte.weight"]) == tie,
            "transformers' head is tied differently from the config")

    params = from_hf_state_dict(original, config)
    back = to_hf_state_dict(params, config)
    require(sorted(back) == sorted(original), "the round trip changed the names")
    for name, value in original.items():
        require(back[name].dtype == np.float32 and back[name].shape == value.shape,
                f"{name}: {back[name].dtype} {back[name].shape} after the round trip")
    out = [exact("HF -> jaxllm -> HF", {n: (back[n], original[n]) for n in original})]

    # The same weights from a safetensors file (safetensors wants no shared tensors).
    path = folder / "model.safetensors"
    save_file({k: v.copy() for k, v in original.items()}, str(path))
    from_file = {}
    for source in (path, str(path), folder):  # a path, a string, a directory
        loaded = leaves_with_paths(from_hf_state_dict(source, config))
        require([p for p, _ in loaded] == [p for p, _ in leaves_with_paths(params)],
                f"{source!r}: another parameter tree")
        from_file.update({f"{type(source).__name__} {p}": (v, w) for (p, v), (_, w)
                          in zip(loaded, leaves_with_paths(params))})
    out.append(exact("safetensors file -> jaxllm", from_file))

    # jaxllm's own safetensors writer loads back into PyTorch unchanged.
    from safetensors.torch import load_file

    save_safetensors(params, config, folder / "ours.safetensors")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_kwargs(config)))
    model.load_state_dict(load_file(str(folder / "ours.safetensors")), strict=True)
    # Same parameter count, but for the zero c_attn.bias HF keeps when jaxllm has none.
    hf_extra = 0 if qkv_bias else config.n_layers * 3 * config.emb_dim
    out.append(exact("parameter count (transformers vs count_params)",
                     (model.num_parameters(), count_params(config) + hf_extra)))
    out.append(exact("jaxllm's safetensors -> transformers",
                     {n: (v.numpy(), original[n]) for n, v in model.state_dict().items()}))
    return out


# -- the report's checks ----------------------------------------------------------------
for _tie in (True, False):
    for _bias in (True, False):
        register(f"gpt2: logits, every attention ({_variant(_tie, _bias)})",
                 tie=_tie, qkv_bias=_bias)(logits)
        register(f"gpt2: loss and gradients ({_variant(_tie, _bias)})",
                 tie=_tie, qkv_bias=_bias)(gradients)
        register(f"gpt2: weight conversion ({_variant(_tie, _bias)})",
                 tie=_tie, qkv_bias=_bias)(hf_round_trip)
for _impl in CPU_ATTN_IMPLS[1:]:
    register(f"gpt2: loss and gradients ({_impl} attention)",
             tie=False, qkv_bias=True, attn_impl=_impl, seed=5)(gradients)
if ON_X86:
    for _tie in (True, False):
        for _matmul in ("mkl", "xla"):
            register(f"gpt2: CPU kernel recipe ({'tied' if _tie else 'untied'}, "
                     f"{_matmul} products)", tie=_tie, matmul_impl=_matmul)(cpu_kernel_recipe)
register("gpt2: masked loss")(masked_loss)
for _tie in (True, False):
    register(f"gpt2: AdamW steps ({'tied' if _tie else 'untied'})", tie=_tie)(adamw_steps)
register("gpt2: decoupled, masked weight decay")(weight_decay)
register("gpt2: greedy tokens vs generate()")(greedy_tokens)
