"""Direct preference optimisation (DPO): the loss, its task, and the cached reference.

For a prompt with a preferred (chosen) and a rejected answer, DPO trains the
policy π against a frozen reference π_ref (the starting model):

    loss = -log σ(β · ((log π(chosen) - log π(rejected))
                       - (log π_ref(chosen) - log π_ref(rejected))))

A sequence's log-probability is over its answer's tokens (the batch masks of
`jaxllm.data.preferences.collate`), either their **mean** (the book's
convention; the rewards `log π - log π_ref` are logged without β) or their
**sum** (the DPO paper's and TRL's; the rewards are β · (log π - log π_ref)).

- `sequence_logprobs(params, tokens, mask, config, reduction=...)`: one value a row.
- `dpo_loss(...)`: (loss, chosen reward, rejected reward), batch means.
- `dpo_task(beta, reduction)`: a task for `jaxllm.train.step.make_train_step`
  over batches holding both sequences and the reference's values
  ("ref_chosen", "ref_rejected"): the reference never runs during training.
- `reference_logprobs(params, config, pairs, ...)`: those values for every
  pair, in one pass before training. With LoRA the reference is the same
  weights with the adapters off (`reference_params`): no second model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import lora
from jaxllm.config import GPTConfig
from jaxllm.model import apply
from jaxllm.ops import token_nll_op

REDUCTIONS = ("mean", "sum")


def sequence_logprobs(params, tokens, mask, config: GPTConfig, *, reduction: str = "mean",
                      rng=None):
    """(batch,) float32: the log-probability of each row's masked-in tokens given
    the tokens before them (position 0 has nothing before it and never counts),
    summed or averaged over them (a row with none has mean 0)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    logits = apply(params, tokens[:, :-1], config, rng=rng, upcast_logits=False)
    logp = -token_nll_op(config.loss_impl)(logits, tokens[:, 1:])
    weight = mask[:, 1:].astype(jnp.float32)
    total = jnp.sum(jnp.where(weight > 0, logp * weight, 0.0), axis=-1)
    if reduction == "sum":
        return total
    return total / jnp.maximum(weight.sum(-1), 1.0)


def pair_logprobs(params, batch, config: GPTConfig, *, reduction: str = "mean", rng=None):
    """(chosen, rejected) sequence log-probabilities of a preference batch, from one
    forward pass over both halves."""
    b = batch["chosen"].shape[0]
    tokens = jnp.concatenate([batch["chosen"], batch["rejected"]])
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    logp = sequence_logprobs(params, tokens, mask, config, reduction=reduction, rng=rng)
    return logp[:b], logp[b:]


def dpo_losses(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float, *,
               scale_rewards: bool = False):
    """Per row: (loss, chosen reward, rejected reward); the rewards carry no gradient
    and are multiplied by β when `scale_rewards` (the sum convention)."""
    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = -jax.nn.log_sigmoid(beta * logits)
    scale = beta if scale_rewards else 1.0
    chosen = jax.lax.stop_gradient(scale * (policy_chosen - ref_chosen))
    rejected = jax.lax.stop_gradient(scale * (policy_rejected - ref_rejected))
    return losses, chosen, rejected


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1, *,
             scale_rewards: bool = False):
    """(loss, chosen reward, rejected reward): means over the batch of `dpo_losses`."""
    losses, chosen, rejected = dpo_losses(policy_chosen, policy_rejected, ref_chosen,
                                          ref_rejected, beta, scale_rewards=scale_rewards)
    return losses.mean(), chosen.mean(), rejected.mean()


@dataclasses.dataclass(frozen=True)
class DPOTask:
    """The DPO loss as a task (`jaxllm.train.task`): the summed loss over the
    pairs, the pair count, and sums of the rewards, the margin and the pairs
    with a positive margin (divided by the count, their means). Hashable, so
    a resumed run reuses the compiled step."""

    beta: float = 0.1
    reduction: str = "mean"

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"DPO log-probabilities are the 'mean' or the 'sum' over the "
                             f"answer's tokens, got {self.reduction!r}")
        if not (isinstance(self.beta, (int, float)) and 0 < self.beta < float("inf")):
            raise ValueError(f"DPO beta must be a positive number, got {self.beta!r}")

    def __call__(self, params, batch, config: GPTConfig, rng=None):
        chosen, rejected = pair_logprobs(params, batch, config, reduction=self.reduction, rng=rng)
        losses, r_chosen, r_rejected = dpo_losses(
            chosen, rejected, batch["ref_chosen"], batch["ref_rejected"], self.beta,
            scale_rewards=self.reduction == "sum")
        margin = r_chosen - r_rejected
        aux = {"chosen_reward": r_chosen.sum(), "rejected_reward": r_rejected.sum(),
               "reward_margin": margin.sum(),
               "reward_accuracy": (margin > 0).astype(jnp.float32).sum()}
        return losses.sum(), jnp.asarray(losses.shape[0], jnp.float32), aux


def dpo_task(beta: float = 0.1, reduction: str = "mean") -> DPOTask:
    """A task for `make_train_step` / `make_eval_step` on preference batches that
    carry the reference's values ("ref_chosen", "ref_rejected")."""
    return DPOTask(beta, reduction)


def reference_params(params):
    """The frozen reference of a run starting at `params`: the weights with their
    LoRA adapters off (the same arrays, no copy); `params` without adapters."""
    return lora.strip_adapters(params) if lora.adapters_of(params)[0] else params


@functools.lru_cache(maxsize=8)
def _reference_fn(config: GPTConfig, reduction: str):
    return jax.jit(functools.partial(pair_logprobs, config=config, reduction=reduction))


def reference_logprobs(params, config: GPTConfig, pairs: Sequence, batch_size: int, *,
                       reduction: str = "mean", collate_kwargs: dict[str, Any] | None = None
                       ) -> dict[str, np.ndarray]:
    """{"ref_chosen", "ref_rejected"}: float32 (len(pairs),), the reference's
    sequence log-probabilities of every pair (`reference_params(params)`, no
    dropout), in batches of `batch_size` in order."""
    from jaxllm.data.preferences import fixed_pair_batches

    ref = reference_params(params)
    fn = _reference_fn(config, reduction)
    out = [fn(ref, b) for b in fixed_pair_batches(pairs, batch_size, **(collate_kwargs or {}))]
    host = jax.device_get(out)
    return {"ref_chosen": np.concatenate([c for c, _ in host]).astype(np.float32),
            "ref_rejected": np.concatenate([r for _, r in host]).astype(np.float32)}
