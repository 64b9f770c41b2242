"""Fine-tuning against PyTorch: the classifier's AdamW steps (with frozen
blocks, each pooling) and the instruction loss with its masked prompt, its
gradients and AdamW steps, each against `transformers`' GPT-2 trained by
`torch.optim.AdamW`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
import transformers

from jaxllm.config import GPTConfig
from jaxllm.data.instructions import Example, InstructionBatches, collate
from jaxllm.finetune.classify import HEAD, add_class_head, class_logits, classify_task, trainable_for
from jaxllm.hf import to_hf_state_dict
from jaxllm.model import init_params
from jaxllm.parity import Comparison, close, exact, register, require, within
from jaxllm.parity.reference import DECAYED, hf_config, hf_model, random_params
from jaxllm.train import TrainConfig, init_train_state, make_optimizer, make_train_step
from jaxllm.train.task import trainable_mask

# -- the classifier ------------------------------------------------------------------
CLASSIFY_CONFIG = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4,
                            n_layers=2, drop_rate=0.0, qkv_bias=True, tie_embeddings=True)
PAD = 96
N_CLASSES = 3
CLASSIFY_TC = TrainConfig(lr=1e-3, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.1,
                          beta1=0.9, beta2=0.999, eps=1e-8, grad_clip=None, batch_size=8,
                          total_steps=5)
CLASSIFY_ATOL = 1e-5


def random_classifier(seed: int):
    """GPT-2 with a class head, every leaf drawn at random: scales 1 + N(0, 0.1), the
    rest N(0, 0.1), drawn in float64 (the draws these checks' thresholds were set on)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda k: add_class_head(init_params(CLASSIFY_CONFIG, k),
                                                     CLASSIFY_CONFIG, N_CLASSES, k),
                            jax.random.key(0))

    def draw(path, leaf):
        noise = 0.1 * rng.standard_normal(leaf.shape).astype(np.float32)
        return jnp.asarray(noise + 1 if jax.tree_util.keystr(path).endswith("['scale']")
                           else noise)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def classify_batches(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Right-padded rows of random lengths (1 to the full width), random labels."""
    rng = np.random.default_rng(seed)
    width, out = CLASSIFY_CONFIG.context_length, []
    for _ in range(n):
        lengths = rng.integers(1, width + 1, CLASSIFY_TC.batch_size).astype(np.int32)
        tokens = rng.integers(0, PAD, (CLASSIFY_TC.batch_size, width)).astype(np.int32)
        tokens[np.arange(width)[None, :] >= lengths[:, None]] = PAD
        out.append({"tokens": tokens, "lengths": lengths,
                    "labels": rng.integers(0, N_CLASSES, CLASSIFY_TC.batch_size).astype(np.int32)})
    return out


class TorchClassifier(torch.nn.Module):
    """GPT-2 (transformers, eager attention) with a linear class head on its
    final hidden states, pooled as the jaxllm classifier pools."""

    def __init__(self, params, pooling: str):
        super().__init__()
        self.gpt = transformers.GPT2Model(hf_config(CLASSIFY_CONFIG))
        body = {k.removeprefix("transformer."): torch.from_numpy(np.array(v))
                for k, v in to_hf_state_dict(params, CLASSIFY_CONFIG).items()
                if k.startswith("transformer.")}
        self.gpt.load_state_dict(body, strict=False)  # the attention-mask buffers stay
        self.head = torch.nn.Linear(CLASSIFY_CONFIG.emb_dim, N_CLASSES)
        with torch.no_grad():
            self.head.weight.copy_(torch.from_numpy(np.asarray(params[HEAD]["kernel"]).T.copy()))
            self.head.bias.copy_(torch.from_numpy(np.array(params[HEAD]["bias"])))
        self.pooling = pooling

    def forward(self, tokens, lengths):
        h = self.gpt(tokens).last_hidden_state  # after ln_f
        if self.pooling == "last_position":
            pooled = h[:, -1]
        elif self.pooling == "last_token":
            pooled = h[torch.arange(h.shape[0]), lengths - 1]
        else:
            real = (torch.arange(h.shape[1])[None, :] < lengths[:, None]).float()
            pooled = (h * real[..., None]).sum(1) / lengths[:, None].float()
        return self.head(pooled)


def freeze_last_block(model: TorchClassifier) -> dict[str, torch.nn.Parameter]:
    """requires_grad=False on everything but the last block, ln_f and the head;
    the trainable parameters, by name."""
    last = f"gpt.h.{CLASSIFY_CONFIG.n_layers - 1}."
    trained = {}
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith((last, "gpt.ln_f.", "head."))
        if p.requires_grad:
            trained[name] = p
    return trained


@register("fine-tuning: classifier, 6 AdamW steps (last position: the book's replay)",
          pooling="last_position", decay_all=True)
@register("fine-tuning: classifier, 6 AdamW steps (mean pooling, decay on matrices)",
          pooling="mean", decay_all=False)
@register("fine-tuning: classifier, 6 AdamW steps (last token, decay on every parameter)",
          pooling="last_token", decay_all=True)
def classifier_steps(pooling: str, decay_all: bool) -> list[Comparison]:
    """The last block, ln_f and a class head trained by 6 AdamW steps in jaxllm and in
    torch: every loss, the logits after training, every trained weight, and the
    frozen leaves bit for bit as they started."""
    config = CLASSIFY_CONFIG
    tc = CLASSIFY_TC.replace(weight_decay_on="all" if decay_all else "matrices")
    params = random_classifier(seed=1)
    batches = classify_batches(2, seed=2) * 3  # each batch seen three times: the loss must fall
    trainable = trainable_for("last_block", config)
    optimizer = make_optimizer(tc)
    step = make_train_step(config, tc, optimizer, task=classify_task(pooling), trainable=trainable)
    state = init_train_state(jax.tree.map(jnp.copy, params), tc, optimizer, trainable=trainable)

    model = TorchClassifier(params, pooling).train()  # dropout is 0: train mode is deterministic
    trained = freeze_last_block(model)
    if decay_all:  # the book's torch.optim.AdamW(model.parameters(), weight_decay=0.1)
        groups = [{"params": list(trained.values()), "weight_decay": tc.weight_decay}]
    else:  # jaxllm's default: decay on matrices only
        groups = [{"params": [p for p in trained.values() if p.ndim >= 2],
                   "weight_decay": tc.weight_decay},
                  {"params": [p for p in trained.values() if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)
    ours, theirs = [], []
    for batch in batches:
        state, metrics = step(state, batch)
        ours.append(float(metrics["loss"]))
        opt.zero_grad()
        logits = model(torch.from_numpy(batch["tokens"]).long(),
                       torch.from_numpy(batch["lengths"]).long())
        loss = F.cross_entropy(logits, torch.from_numpy(batch["labels"]).long())
        loss.backward()
        opt.step()
        theirs.append(loss.item())
    require(ours[4] < ours[0] - 0.1 and ours[5] < ours[1] - 0.1,
            f"the steps do not learn: losses {ours}")

    with torch.no_grad():
        t_logits = model(torch.from_numpy(batches[0]["tokens"]).long(),
                         torch.from_numpy(batches[0]["lengths"]).long()).numpy()
    j_logits = np.asarray(class_logits(state.params, batches[0], config, pooling=pooling))
    sd = {f"gpt.{k.removeprefix('transformer.')}": v
          for k, v in to_hf_state_dict(state.params, config).items()}
    sd["head.weight"] = np.asarray(state.params[HEAD]["kernel"]).T
    sd["head.bias"] = np.asarray(state.params[HEAD]["bias"])
    d, weights = config.emb_dim, {}
    for name, p in trained.items():
        a, b = sd[name], p.detach().numpy()
        if name.endswith("c_attn.bias"):
            # the key bias adds q.b to every score of a query, which softmax ignores: its
            # true gradient is 0, and Adam scales rounding noise in it up to full steps
            a, b = np.delete(a, np.s_[d:2 * d]), np.delete(b, np.s_[d:2 * d])
        weights[name] = (a, b)

    mask = trainable_mask(params, trainable)
    frozen = {jax.tree_util.keystr(path): (after, before) for (path, m), before, after in zip(
        jax.tree_util.tree_leaves_with_path(mask), jax.tree.leaves(params),
        jax.tree.leaves(state.params)) if not m}
    require(len(frozen) == 2 + 12 * (config.n_layers - 1) and len(trained) == 12 + 2 + 2,
            f"{len(frozen)} frozen leaves, {len(trained)} trained torch parameters")
    return [close("loss at each step", {f"step {k}": (a, b) for k, (a, b)
                                        in enumerate(zip(ours, theirs))}, atol=CLASSIFY_ATOL),
            close("class logits after training", (j_logits, t_logits), atol=CLASSIFY_ATOL),
            close("every trained weight (key bias aside)", weights, atol=CLASSIFY_ATOL),
            exact("every frozen leaf, before and after", frozen)]


# -- instruction fine-tuning ---------------------------------------------------------------
INSTRUCT_CONFIG = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4,
                            n_layers=2, drop_rate=0.0, qkv_bias=True, tie_embeddings=False)
INSTRUCT_EOT = 96  # the tiny vocabulary's end-of-text
# Micro-batches of 2 rows and a fixed width, so one compiled step serves every check.
INSTRUCT_TC = TrainConfig(lr=3e-3, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.1,
                          beta1=0.9, beta2=0.999, eps=1e-8, grad_clip=None, batch_size=4,
                          grad_accum=2, total_steps=6)
COLLATE = dict(pad_id=INSTRUCT_EOT, pad_multiple=INSTRUCT_CONFIG.context_length)


@functools.cache
def instruct_step():
    """The one compiled train step of the instruction checks."""
    return make_train_step(INSTRUCT_CONFIG, INSTRUCT_TC)


def instruct_examples(n: int, seed: int, lo: int = 3, hi: int = 20) -> list[Example]:
    """Random token sequences with a prompt of random length."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(lo, hi))
        out.append(Example(rng.integers(0, INSTRUCT_EOT, length).astype(np.int32),
                           int(rng.integers(1, length))))
    return out


def torch_instruct_loss(model, batch):
    """torch's cross_entropy over a collated batch (ignore_index=-100); loss, logits, targets."""
    logits = model(torch.from_numpy(batch["tokens"]).long()).logits
    targets = torch.from_numpy(batch["targets"]).long()
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100), \
        logits, targets


@register("fine-tuning: instruction loss and gradients (prompt kept)", mask_prompt=False)
@register("fine-tuning: instruction loss and gradients (prompt masked)", mask_prompt=True)
def instruct_gradients(mask_prompt: bool) -> list[Comparison]:
    """One accumulated step (two micro-batches that count different numbers of
    targets) against one torch loss over the whole batch: the loss is the mean
    over every counted target, not a mean of the micro-batches' means."""
    config, tc = INSTRUCT_CONFIG, INSTRUCT_TC
    params = random_params(config, seed=2)
    batch = collate(instruct_examples(4, seed=3), mask_prompt=mask_prompt, **COLLATE)
    counted = (batch["targets"] != -100).sum(axis=1)
    require(counted[:2].sum() != counted[2:].sum(), "the micro-batches count alike")

    model = hf_model(params, config)
    loss, logits, targets = torch_instruct_loss(model, batch)
    loss.backward()
    theirs = {k: p.grad.numpy() for k, p in model.named_parameters()}
    halves = [F.cross_entropy(logits[s].flatten(0, 1), targets[s].flatten(),
                              ignore_index=-100).item() for s in (slice(0, 2), slice(2, 4))]
    require(abs(np.mean(halves) - loss.item()) > 1e-3,
            "a mean of the micro-batches' means would pass too")

    state = init_train_state(jax.tree.map(jnp.copy, params), tc)
    state, metrics = instruct_step()(state, batch)
    # after one step from zero moments, Adam's first moment is (1 - beta1) * gradient
    grads = jax.tree.map(lambda m: m / (1 - tc.beta1), state.opt_state[0].mu)
    ours = to_hf_state_dict(grads, config)
    return [within("loss over the counted targets", (float(metrics["loss"]), loss.item()), 1e-6),
            exact("targets counted", (int(metrics["count"]), int(counted.sum()))),
            within("gradient of every parameter (from Adam's first moment)",
                   {n: (g, theirs[n]) for n, g in ours.items() if n in theirs}, 1e-6)]


@register("fine-tuning: instruction AdamW steps (prompt masked)")
def instruct_steps() -> list[Comparison]:
    """Six AdamW steps (one and a half epochs of bucketed batches, prompts masked)
    against torch.optim.AdamW with GPT-2's decay groups: the loss at every step."""
    config, tc = INSTRUCT_CONFIG, INSTRUCT_TC
    params = random_params(config, seed=4)
    batches = InstructionBatches(instruct_examples(16, seed=5), 4, seed=6,
                                 collate_kwargs=dict(mask_prompt=True, **COLLATE))
    state = init_train_state(jax.tree.map(jnp.copy, params), tc)

    model = hf_model(params, config).train()
    decay = [p for n, p in model.named_parameters() if n.endswith(DECAYED)]
    rest = [p for n, p in model.named_parameters() if all(p is not q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps)
    ours, theirs = [], []
    for k in range(6):
        batch = batches.batch_at(k)
        state, metrics = instruct_step()(state, batch)
        ours.append(float(metrics["loss"]))
        opt.zero_grad()
        loss = torch_instruct_loss(model, batch)[0]
        loss.backward()
        opt.step()
        theirs.append(loss.item())
    require(ours[-1] < ours[0] - 0.1, f"the steps do not learn: losses {ours}")
    return [close("loss at each step", {f"step {k}": (a, b) for k, (a, b)
                                        in enumerate(zip(ours, theirs))}, atol=1e-5)]
