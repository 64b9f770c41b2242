"""LoRA against an independent PyTorch LoRA: the book's `LoRALayer` and
`LinearWithLoRA` beside every `nn.Linear` of a GPT-2 written in torch (q, k
and v as three layers or one, the head adapted too), frozen base weights,
`torch.optim.AdamW` over the adapters; and a classifier adapted on every
linear layer and its class head, as the book's appendix E does."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn as nn

from jaxllm import lora
from jaxllm.config import GPTConfig
from jaxllm.finetune.classify import HEAD, add_class_head, class_logits, classify_task
from jaxllm.model import apply, init_params
from jaxllm.parity import Comparison, close, exact, register, require
from jaxllm.train import TrainConfig, init_train_state, make_optimizer, make_train_step
from jaxllm.train.task import (combine, count_trainable, lm_batch, lm_task, partition,
                               trainable_mask)

CONFIG = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2,
                   drop_rate=0.0, qkv_bias=True, attn_impl="reference")
ALPHA, RANK = 8.0, 4


def random_params(config=CONFIG, seed=0):
    """Non-trivial values everywhere (LayerNorm scales and biases too), drawn
    by NumPy into `init_params`' shapes (nothing to compile)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda k: init_params(config, k), jax.random.key(0))
    return jax.tree.map(lambda s: jnp.asarray(
        (1.0 if len(s.shape) == 1 else 0.0) + rng.normal(0, 0.2, s.shape).astype(np.float32)
        / (math.sqrt(s.shape[0]) if len(s.shape) == 2 else 1.0)), shapes)


def random_adapters(params, config=CONFIG, qkv="split", seed=1, targets="all"):
    """Fresh adapters with B random too, so that A's gradient is not zero."""
    adapters = lora.init_lora(params, config, jax.random.key(seed), rank=RANK, targets=targets,
                              qkv=qkv)
    keys = iter(jax.random.split(jax.random.key(seed + 50), len(adapters)))
    return {p: {"a": ab["a"], "b": 0.2 * jax.random.normal(next(keys), ab["b"].shape)}
            for p, ab in adapters.items()}


def tokens(config=CONFIG, shape=(3, 12), seed=2):
    rng = np.random.default_rng(seed)
    return rng.integers(0, config.vocab_size, size=(shape[0], shape[1] + 1)).astype(np.int32)


@functools.partial(jax.jit, static_argnums=2)
def logits(params, x, config=CONFIG):
    return apply(params, x, config)


def random_classifier(seed=0):
    """`random_params` with a 2-class head."""
    return add_class_head(random_params(seed=seed), CONFIG, 2, jax.random.key(seed + 7))


def class_batch(seed=3, shape=(3, 12)):
    rng = np.random.default_rng(seed)
    return {"tokens": rng.integers(0, CONFIG.vocab_size, shape).astype(np.int32),
            "lengths": rng.integers(1, shape[1] + 1, shape[0]).astype(np.int32),
            "labels": rng.integers(0, 2, shape[0]).astype(np.int32)}


clf_logits = jax.jit(class_logits, static_argnames=("config", "pooling"))


def every_layer_adapters(params, init="peft", seed=1):
    """Adapters on every dense layer, the class head included, B random too."""
    adapters = lora.init_lora(params, CONFIG, jax.random.key(seed), rank=RANK, targets="all",
                              tied_head=False, init=init, allow_rank_above_dim=True)
    keys = iter(jax.random.split(jax.random.key(seed + 50), len(adapters)))
    return {p: {"a": ab["a"], "b": 0.2 * jax.random.normal(next(keys), ab["b"].shape)}
            for p, ab in adapters.items()}


@functools.partial(jax.jit, static_argnums=2)
def lora_grads(adapted, batch, config=CONFIG):
    """The mean next-token loss and its gradient for the adapters alone."""
    mask = trainable_mask(adapted, lora.TRAINABLE)
    train, frozen = partition(adapted, mask)

    def loss(t):
        s, n, _ = lm_task(combine(t, frozen), batch, config)
        return s / n

    return jax.value_and_grad(loss)(train)


# -- the independent PyTorch LoRA ------------------------------------------------------
class LoRALayer(nn.Module):
    """The book's LoRALayer: alpha * (x @ A @ B) with scale "book", PEFT's
    (alpha / rank) * (x @ A @ B) with "peft"."""

    def __init__(self, a, b, alpha, scale="peft"):
        super().__init__()
        self.A = nn.Parameter(torch.tensor(np.asarray(a)))
        self.B = nn.Parameter(torch.tensor(np.asarray(b)))
        self.scale = alpha / self.A.shape[1] if scale == "peft" else alpha

    def forward(self, x):
        return self.scale * (x @ self.A @ self.B)


class LinearWithLoRA(nn.Module):
    def __init__(self, linear, lora_layer):
        super().__init__()
        self.linear, self.lora = linear, lora_layer

    def forward(self, x):
        return self.linear(x) + self.lora(x)


def frozen_linear(dense):
    w = np.asarray(dense["kernel"])
    layer = nn.Linear(w.shape[0], w.shape[1], bias="bias" in dense)
    layer.weight.data = torch.tensor(w.T.copy())
    if "bias" in dense:
        layer.bias.data = torch.tensor(np.asarray(dense["bias"]))
    layer.requires_grad_(False)
    return layer


def adapted_linear(dense, ab, alpha, cols=slice(None), index=None, scale="peft"):
    d = {"kernel": np.asarray(dense["kernel"])[:, cols]}
    if "bias" in dense:
        d["bias"] = np.asarray(dense["bias"])[cols]
    a, b = (ab["a"], ab["b"]) if index is None else (ab["a"][index], ab["b"][index])
    return LinearWithLoRA(frozen_linear(d), LoRALayer(a, b, alpha, scale))


def frozen_norm(p):
    norm = nn.LayerNorm(p["scale"].shape[0], eps=CONFIG.ln_eps)
    norm.weight.data, norm.bias.data = (torch.tensor(np.asarray(p[k])) for k in ("scale", "bias"))
    norm.requires_grad_(False)
    return norm


class TorchBlock(nn.Module):
    """A GPT-2 block built from nn.Linear layers, each with a LoRA beside it;
    q, k and v as three layers (split) or one (fused)."""

    def __init__(self, p, ad, prefix, qkv, alpha, scale="peft"):
        super().__init__()
        e = p["attn"]["qkv"]["kernel"].shape[0]
        self.n_heads, self.split = CONFIG.n_heads, qkv == "split"
        name = f"{prefix}/attn/qkv"
        if self.split:
            self.q, self.k, self.v = (adapted_linear(p["attn"]["qkv"], ad[name], alpha,
                                                     slice(i * e, (i + 1) * e), i, scale)
                                      for i in range(3))
        else:
            self.qkv = adapted_linear(p["attn"]["qkv"], ad[name], alpha, scale=scale)
        self.out = adapted_linear(p["attn"]["out"], ad[f"{prefix}/attn/out"], alpha, scale=scale)
        self.fc = adapted_linear(p["ffn"]["fc"], ad[f"{prefix}/ffn/fc"], alpha, scale=scale)
        self.proj = adapted_linear(p["ffn"]["proj"], ad[f"{prefix}/ffn/proj"], alpha,
                                   scale=scale)
        self.norm1, self.norm2 = frozen_norm(p["norm1"]), frozen_norm(p["norm2"])

    def forward(self, x):
        b, t, e = x.shape
        h = self.norm1(x)
        q, k, v = (self.q(h), self.k(h), self.v(h)) if self.split else self.qkv(h).split(e, -1)
        q, k, v = (z.view(b, t, self.n_heads, -1).transpose(1, 2) for z in (q, k, v))
        att = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        att = att.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
        a = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, t, e)
        x = x + self.out(a)
        return x + self.proj(nn.functional.gelu(self.fc(self.norm2(x)), approximate="tanh"))


class TorchGPT(nn.Module):
    """The book's GPT with `replace_linear_with_lora` applied: every linear
    layer, the head (`head`: "out_head", or a classifier's "class_head") too."""

    def __init__(self, params, adapters, qkv, alpha=ALPHA, scale="peft", head="out_head"):
        super().__init__()
        self.tok = nn.Parameter(torch.tensor(np.asarray(params["tok_emb"]["embedding"])),
                                requires_grad=False)
        self.pos = nn.Parameter(torch.tensor(np.asarray(params["pos_emb"]["embedding"])),
                                requires_grad=False)
        self.blocks = nn.ModuleList(TorchBlock(p, adapters, f"blocks/{i}", qkv, alpha, scale)
                                    for i, p in enumerate(params["blocks"]))
        self.norm = frozen_norm(params["final_norm"])
        self.head_name = head
        self.head = adapted_linear(params[head], adapters[head], alpha, scale=scale)

    def hidden(self, idx):
        x = self.tok[idx] + self.pos[: idx.shape[1]]
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, idx):
        return self.head(self.hidden(idx))

    def _layers(self):
        """(jaxllm adapter path, [LinearWithLoRA, ...]): q, k, v stacked as jaxllm stacks them."""
        for i, blk in enumerate(self.blocks):
            pre = f"blocks/{i}"
            yield f"{pre}/attn/qkv", [blk.q, blk.k, blk.v] if blk.split else [blk.qkv]
            for name, layer in (("attn/out", blk.out), ("ffn/fc", blk.fc), ("ffn/proj", blk.proj)):
                yield f"{pre}/{name}", [layer]
        yield self.head_name, [self.head]

    def _collect(self, value):
        out = {}
        for path, layers in self._layers():
            a, b = ([value(getattr(l.lora, n)) for l in layers] for n in ("A", "B"))
            out[path] = (np.stack(a), np.stack(b)) if len(layers) > 1 else (a[0], b[0])
        return out

    def lora_grads(self):
        """{jaxllm adapter path: (grad A, grad B)}, split adapters stacked like jaxllm's."""
        return self._collect(lambda p: p.grad.numpy())

    def adapters(self):
        """{jaxllm adapter path: {"a", "b"}} of the current values, stacked like jaxllm's."""
        return {path: {"a": a, "b": b}
                for path, (a, b) in self._collect(lambda p: p.detach().numpy().copy()).items()}


def torch_loss(model, x, y):
    logits_t = model(torch.tensor(x, dtype=torch.long))
    return logits_t, nn.functional.cross_entropy(logits_t.flatten(0, 1), torch.tensor(
        y, dtype=torch.long).flatten())


# -- the checks --------------------------------------------------------------------------
@register("LoRA: logits, loss and adapter gradients (q, k, v fused)", qkv="fused")
@register("LoRA: logits, loss and adapter gradients (q, k, v split)", qkv="split")
def logits_and_gradients(qkv: str) -> list[Comparison]:
    """Adapters on every layer (B random too): logits, loss and each adapter's gradient."""
    params = random_params()
    adapters = random_adapters(params, qkv=qkv)
    adapted = lora.with_adapters(params, adapters, ALPHA)
    data = tokens()
    x, y = data[:, :-1], data[:, 1:]
    model = TorchGPT(params, adapters, qkv)
    require(sum(p.numel() for p in model.parameters() if p.requires_grad)
            == lora.count_lora_params(adapters), "torch trains another number of parameters")
    t_logits, t_loss = torch_loss(model, x, y)
    t_loss.backward()
    loss, grads = lora_grads(adapted, lm_batch(x, y))
    ours, theirs = lora.adapters_of(grads)[0], model.lora_grads()
    require(set(ours) == set(theirs), "the adapted layers differ")
    for path, (ga, gb) in theirs.items():
        require(np.abs(ga).max() > 0 and np.abs(gb).max() > 0, f"{path}: a zero torch gradient")
    return [close("logits", (np.asarray(logits(adapted, x, CONFIG)), t_logits.detach().numpy()),
                  atol=1e-5, rtol=1e-5),
            close("loss", (float(loss), t_loss.item()), atol=0.0, rtol=1e-5),
            close("gradient of every adapter (A and B)",
                  {f"{path}/{n}": (np.asarray(ours[path][n]), g)
                   for path, (ga, gb) in theirs.items() for n, g in (("a", ga), ("b", gb))},
                  atol=1e-5, rtol=1e-4)]


@register("LoRA: 5 AdamW steps on the adapters, base frozen")
def adamw_steps() -> list[Comparison]:
    """Five AdamW steps over the adapters alone (q, k, v split): the loss at every
    step, and the base weights bit for bit as they started."""
    params = random_params()
    adapters = random_adapters(params)
    adapted = lora.with_adapters(params, adapters, ALPHA)
    base = jax.tree.map(np.asarray, params)
    lr, wd = 1e-2, 0.05
    tc = TrainConfig(batch_size=3, total_steps=5, warmup_steps=0, min_lr_ratio=1.0, lr=lr)
    opt = optax.adamw(lr, 0.9, 0.999, 1e-8, weight_decay=wd)
    state = init_train_state(adapted, tc, opt, trainable=lora.TRAINABLE)
    # frozen leaves keep no moments: the optimizer state holds the adapters' shapes only
    moments = [x for x in jax.tree.leaves(state.opt_state) if jnp.ndim(x) > 0]
    require(len(moments) == 2 * 2 * len(adapters)
            and sum(x.size for x in moments) == 2 * lora.count_lora_params(adapters),
            "the optimizer keeps moments for frozen leaves")
    step = make_train_step(CONFIG, tc, opt, trainable=lora.TRAINABLE)
    model = TorchGPT(params, adapters, "split")
    t_opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                              betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    ours, theirs = [], []
    data = tokens(seed=10)
    x, y = data[:, :-1], data[:, 1:]
    for _ in range(5):
        state, metrics = step(state, lm_batch(jnp.asarray(x), jnp.asarray(y)))
        ours.append(float(metrics["loss"]))
        t_opt.zero_grad()
        _, t_loss = torch_loss(model, x, y)
        t_loss.backward()
        t_opt.step()
        theirs.append(t_loss.item())
    require(ours[-1] < ours[0], f"the steps do not learn: losses {ours}")
    trained = lora.strip_adapters(state.params)
    return [close("loss at each step", {f"step {k}": (a, b) for k, (a, b)
                                        in enumerate(zip(ours, theirs))}, atol=0.0, rtol=1e-5),
            exact("every base weight, before and after",
                  {jax.tree_util.keystr(p): (np.asarray(got), want) for (p, got), want in zip(
                      jax.tree_util.tree_leaves_with_path(trained), jax.tree.leaves(base))})]


@register("LoRA: classifier adapted on every layer and its head, 5 AdamW steps (appendix E)")
def classifier_steps() -> list[Comparison]:
    """The book's appendix E in small: its LoRALayer (alpha * x A B, A drawn as
    the book draws it) on every linear layer of the book's GPT and on the class
    head, everything else frozen, torch.optim.AdamW over the adapters; against
    jaxllm's "book" conventions and `TrainConfig.torch_adamw`: the loss at every
    step, every adapter and the logits after, the base weights bit for bit."""
    clf = random_classifier(seed=4)
    adapters = every_layer_adapters(clf, init="book")
    require(len(adapters) == 4 * CONFIG.n_layers + 1 and HEAD in adapters,
            f"adapters on {sorted(adapters)}")
    alpha = 2.0
    adapted = lora.with_adapters(clf, adapters, alpha, "book")
    tc = TrainConfig.torch_adamw(2e-3, weight_decay=0.1, batch_size=3, total_steps=5)
    opt = make_optimizer(tc)
    state = init_train_state(jax.tree.map(jnp.copy, adapted), tc, opt,  # the step donates it
                             trainable=lora.TRAINABLE)
    step = make_train_step(CONFIG, tc, opt, task=classify_task("last_token"),
                           trainable=lora.TRAINABLE)
    model = TorchGPT(clf, adapters, "split", alpha, scale="book", head=HEAD)
    trained = [p for p in model.parameters() if p.requires_grad]
    require(sum(p.numel() for p in trained) == lora.count_lora_params(adapters)
            == count_trainable(adapted, lora.TRAINABLE), "torch trains another number of values")
    t_opt = torch.optim.AdamW(trained, lr=2e-3, weight_decay=0.1)  # torch's defaults otherwise

    def torch_logits(batch):
        h = model.hidden(torch.from_numpy(batch["tokens"]).long())
        return model.head(h[torch.arange(h.shape[0]), torch.from_numpy(batch["lengths"]) - 1])

    ours, theirs = [], []
    for k in range(5):
        batch = class_batch(seed=20 + k)
        state, metrics = step(state, batch)
        ours.append(float(metrics["loss"]))
        t_opt.zero_grad()
        loss = nn.functional.cross_entropy(torch_logits(batch),
                                           torch.from_numpy(batch["labels"]).long())
        loss.backward()
        t_opt.step()
        theirs.append(loss.item())
    got, want = lora.adapters_of(state.params)[0], model.adapters()
    require(set(got) == set(want), "the adapted layers differ")
    for path, ab in want.items():
        for n in ("a", "b"):
            require(not np.allclose(ab[n], np.asarray(adapters[path][n])), f"{path}/{n} did not move")
    batch = class_batch(seed=30)
    with torch.no_grad():
        t_logits = torch_logits(batch).numpy()
    return [close("loss at each step", {f"step {k}": (a, b) for k, (a, b)
                                        in enumerate(zip(ours, theirs))}, atol=1e-5),
            close("every adapter after the steps",
                  {f"{path}/{n}": (np.asarray(got[path][n]), ab[n])
                   for path, ab in want.items() for n in ("a", "b")}, atol=1e-5),
            close("class logits after the steps",
                  (np.asarray(clf_logits(state.params, batch, CONFIG)), t_logits), atol=1e-5),
            exact("every base weight, before and after",
                  {jax.tree_util.keystr(p): (np.asarray(g), np.asarray(w)) for (p, g), w in zip(
                      jax.tree_util.tree_leaves_with_path(lora.strip_adapters(state.params)),
                      jax.tree.leaves(clf))})]
