"""The optimizer: AdamW, warmup + cosine, gradient clipping.

Weight decay falls on the weight matrices only (GPT-2's and nanoGPT's
choice; `weight_decay_on="matrices"`) or on every trained parameter
(`weight_decay_on="all"`: what `torch.optim.AdamW(model.parameters())` does,
and so the book's). `TrainConfig.torch_adamw(lr, weight_decay)` is torch's
AdamW in one line: betas (0.9, 0.999), eps 1e-8, no warm-up, a constant
learning rate, no clipping, decay on every parameter.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import optax


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run-length settings (model shape lives in `GPTConfig`)."""

    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    total_steps: int = 1000
    weight_decay: float = 0.1
    weight_decay_on: str = "matrices"  # "matrices" (dense kernels) or "all" (every trained leaf)
    decay_embeddings: bool = False  # with "matrices": the embedding tables decay too
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # global-norm clip; None turns it off
    batch_size: int = 16  # sequences per optimizer step
    grad_accum: int = 1  # micro-batches per step; batch_size must divide by it
    seed: int = 0
    init: str = "gpt2"  # parameter initialisation scheme, see `jaxllm.model.init_params`

    def __post_init__(self) -> None:
        for name in ("total_steps", "batch_size", "grad_accum"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {v!r}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) \
                or self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"TrainConfig.batch_size ({self.batch_size}) must be divisible by "
                             f"grad_accum ({self.grad_accum})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be a positive number, got {self.lr!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.weight_decay_on not in DECAY_ON:
            raise ValueError(f"TrainConfig.weight_decay_on must be one of {DECAY_ON}, "
                             f"got {self.weight_decay_on!r}")
        if self.init not in ("gpt2", "torch"):
            raise ValueError(f"TrainConfig.init must be 'gpt2' or 'torch', got {self.init!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be positive or None, got {self.grad_clip!r}")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def torch_adamw(cls, lr: float = 1e-3, weight_decay: float = 0.01, **changes
                    ) -> "TrainConfig":
        """The settings of `torch.optim.AdamW(model.parameters(), lr, weight_decay=...)`
        stepped without a scheduler or clipping (torch's defaults: lr 1e-3,
        weight decay 0.01), with any other field in `changes`."""
        return cls(**{**TORCH_ADAMW, "lr": lr, "weight_decay": weight_decay, **changes})


DECAY_ON = ("matrices", "all")
TORCH_ADAMW = dict(beta1=0.9, beta2=0.999, eps=1e-8, warmup_steps=0, min_lr_ratio=1.0,
                   grad_clip=None, weight_decay_on="all")
"""The TrainConfig fields of torch's AdamW without a scheduler or clipping."""


def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to `lr`, then cosine decay to `lr * min_lr_ratio`."""
    warmup = min(tc.warmup_steps, tc.total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=warmup,
        decay_steps=max(tc.total_steps, warmup + 1), end_value=tc.lr * tc.min_lr_ratio)


def weight_decay_mask(params, *, decay_embeddings: bool = False):
    """True for the leaves that get weight decay: dense kernels (2-D) and, when
    asked, the embedding tables; never biases or LayerNorm parameters."""
    def decide(path, leaf):
        names = [getattr(k, "key", getattr(k, "name", None)) for k in path]
        if "embedding" in names:
            return decay_embeddings
        return leaf.ndim >= 2

    return jax.tree_util.tree_map_with_path(decide, params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """optax AdamW with the schedule, the decay of `tc.weight_decay_on` and
    (optional) global-norm clipping."""
    mask = None if tc.weight_decay_on == "all" else (
        lambda p: weight_decay_mask(p, decay_embeddings=tc.decay_embeddings))
    adamw = optax.adamw(learning_rate=lr_schedule(tc), b1=tc.beta1, b2=tc.beta2, eps=tc.eps,
                        weight_decay=tc.weight_decay, mask=mask)
    if tc.grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw)
