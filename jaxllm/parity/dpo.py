"""DPO against PyTorch: the loss and its gradient against the formula written
in torch, and AdamW steps of jaxllm's DPO task against an independent torch
DPO (the book's compute_logprobs and compute_dpo_loss) on `transformers`' GPT-2."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from jaxllm.data.preferences import Pair, PreferenceBatches
from jaxllm.finetune.dpo import dpo_loss, dpo_task, reference_logprobs
from jaxllm.hf import to_hf_state_dict
from jaxllm.parity import Comparison, close, register, require, within
from jaxllm.parity.finetune import INSTRUCT_CONFIG, INSTRUCT_EOT
from jaxllm.parity.reference import DECAYED, hf_model, random_params
from jaxllm.train import TrainConfig, init_train_state, make_train_step

CONFIG = INSTRUCT_CONFIG
COLLATE = dict(pad_id=INSTRUCT_EOT, pad_multiple=CONFIG.context_length,
               allowed_max_length=CONFIG.context_length)
# eps above the float32 rounding noise of DPO's small gradients (beta times a mean over
# tokens): at 1e-8 Adam scales an element whose gradient is near 0 up to a full step of noise
TC = TrainConfig(lr=3e-3, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.1, beta2=0.999,
                 eps=1e-6, grad_clip=None, batch_size=4, total_steps=5)


def torch_dpo_loss(pc, pr, rc, rr, beta, scale_rewards=False):
    """An independent transcription of the formula (the book's compute_dpo_loss;
    TRL's rewards carry beta)."""
    logits = (pc - pr) - (rc - rr)
    losses = -F.logsigmoid(beta * logits)
    scale = beta if scale_rewards else 1.0
    return (losses.mean(), (scale * (pc - rc)).detach().mean(),
            (scale * (pr - rr)).detach().mean())


def torch_logprobs(model, tokens, mask, reduction):
    """The book's compute_logprobs (reduction "mean"), or its sum."""
    logits = model(torch.from_numpy(tokens).long()).logits
    labels = torch.from_numpy(tokens).long()[:, 1:]
    log_probs = F.log_softmax(logits[:, :-1, :], dim=-1)
    selected = torch.gather(log_probs, -1, labels.unsqueeze(-1)).squeeze(-1)
    m = torch.from_numpy(mask[:, 1:]).float()
    total = (selected * m).sum(-1)
    return total if reduction == "sum" else total / m.sum(-1)


def tiny_pairs(n: int, seed: int, lo: int = 4, hi: int = 16) -> list[Pair]:
    """Pairs of random responses after a shared prompt of random length."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        prefix = int(rng.integers(1, lo))
        seqs = [np.concatenate([np.arange(prefix) + 3,
                                rng.integers(0, INSTRUCT_EOT, int(rng.integers(1, hi)))]
                               ).astype(np.int32) for _ in range(2)]
        out.append(Pair(seqs[0], seqs[1], prefix))
    return out


@register("DPO: loss, rewards and gradient vs the formula in torch (beta 0.5, rewards scaled)",
          beta=0.5, scale=True)
@register("DPO: loss, rewards and gradient vs the formula in torch (beta 0.1)",
          beta=0.1, scale=False)
def loss_formula(beta: float, scale: bool) -> list[Comparison]:
    """`dpo_loss` on random log-probabilities against torch's logsigmoid formula."""
    rng = np.random.default_rng(0)
    values = [(-3 * rng.random(16)).astype(np.float32) for _ in range(4)]
    loss, chosen, rejected = dpo_loss(*map(jnp.asarray, values), beta, scale_rewards=scale)
    grads = jax.grad(lambda pc, pr: dpo_loss(pc, pr, *map(jnp.asarray, values[2:]), beta)[0],
                     argnums=(0, 1))(*map(jnp.asarray, values[:2]))
    t = [torch.tensor(v, requires_grad=i < 2) for i, v in enumerate(values)]
    tl, tc, tr = torch_dpo_loss(*t, beta, scale)
    tl.backward()
    require(np.abs(grads[0]).min() > 1e-4, "a row has no gradient worth comparing")
    return [within("loss and both rewards", {"loss": (float(loss), tl.item()),
                                             "chosen reward": (float(chosen), tc.item()),
                                             "rejected reward": (float(rejected), tr.item())},
                   1e-6),
            close("gradient of both policy log-probabilities",
                  {"chosen": (grads[0], t[0].grad.numpy()),
                   "rejected": (grads[1], t[1].grad.numpy())}, atol=1e-6)]


@register("DPO: 5 AdamW steps (summed log-probabilities, beta 0.5)", reduction="sum", beta=0.5)
@register("DPO: 5 AdamW steps (mean log-probabilities, beta 0.1)", reduction="mean", beta=0.1)
def adamw_steps(reduction: str, beta: float) -> list[Comparison]:
    """jaxllm's DPO task (cached reference log-probabilities) and an independent
    torch DPO (the reference model run on every batch), both trained by AdamW with
    GPT-2's decay groups: loss and rewards at every step, every weight after."""
    params = random_params(CONFIG, seed=11)
    pairs = tiny_pairs(12, seed=12)
    cache = reference_logprobs(params, CONFIG, pairs, 4, reduction=reduction,
                               collate_kwargs=COLLATE)
    batches = PreferenceBatches(pairs, 4, seed=13, collate_kwargs=COLLATE, reference=cache)
    step = make_train_step(CONFIG, TC, task=dpo_task(beta, reduction))
    state = init_train_state(jax.tree.map(jnp.copy, params), TC)

    model = hf_model(params, CONFIG).train()
    decay = [p for n, p in model.named_parameters() if n.endswith(DECAYED)]
    rest = [p for n, p in model.named_parameters() if all(p is not q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": TC.weight_decay},
                             {"params": rest, "weight_decay": 0.0}],
                            lr=TC.lr, betas=(TC.beta1, TC.beta2), eps=TC.eps)
    reference = hf_model(params, CONFIG)  # the frozen start, run by torch on every batch
    ours, theirs = {}, {}
    for k in range(5):
        batch = batches.batch_at(k)
        state, m = step(state, batch)
        ours[k] = [float(m["loss"])] + [float(m[key]) / 4 for key in
                                        ("chosen_reward", "rejected_reward")]
        opt.zero_grad()
        pc, pr = (torch_logprobs(model, batch[key], batch[f"{key}_mask"], reduction)
                  for key in ("chosen", "rejected"))
        with torch.no_grad():
            rc, rr = (torch_logprobs(reference, batch[key], batch[f"{key}_mask"], reduction)
                      for key in ("chosen", "rejected"))
        loss, chosen, rejected = torch_dpo_loss(pc, pr, rc, rr, beta, reduction == "sum")
        loss.backward()
        opt.step()
        theirs[k] = [loss.item(), chosen.item(), rejected.item()]
    require(ours[4][0] < ours[0][0] - 0.01, f"the steps do not learn: losses "
                                            f"{[v[0] for v in ours.values()]}")
    weights = {k: p.detach().numpy() for k, p in model.named_parameters()}
    d, pairs_w = CONFIG.emb_dim, {}
    for name, w in to_hf_state_dict(state.params, CONFIG).items():
        if name in weights:
            t = weights[name]
            if name.endswith("c_attn.bias"):
                # the key bias adds q.b to every score of a query, which softmax ignores: its
                # true gradient is 0, and Adam scales rounding noise in it up to full steps
                w, t = np.delete(w, np.s_[d:2 * d]), np.delete(t, np.s_[d:2 * d])
            pairs_w[name] = (w, t)
    return [close("loss, chosen and rejected reward at each step",
                  {f"step {k}": (ours[k], theirs[k]) for k in ours}, atol=1e-5),
            close("step 0 loss vs ln 2 (policy = reference)", (ours[0][0], math.log(2)),
                  atol=1e-6),
            close("every weight after the steps (key bias aside)", pairs_w, atol=1e-5)]
