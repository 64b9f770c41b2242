"""The jitted train and eval steps.

`train_step(state, inputs, targets)` does one optimizer step on a batch of
shape (batch, seq): it splits the batch into `grad_accum` micro-batches,
sums their gradients in a `lax.scan`, then applies the optimizer. The state
is donated, so XLA updates parameters and optimizer moments in place, and
the step returns its metrics as device arrays: nothing in it waits on the
host. Dropout keys are derived from (seed, step), so a resumed run draws the
same masks as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxllm.config import GPTConfig
from jaxllm.loss import cross_entropy
from jaxllm.model import apply
from jaxllm.train.optim import TrainConfig, lr_schedule, make_optimizer


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array  # base dropout key (raw uint32 data, so it saves like any array)


def init_train_state(params, tc: TrainConfig, optimizer: optax.GradientTransformation | None = None
                     ) -> TrainState:
    optimizer = optimizer or make_optimizer(tc)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params),
                      rng=jax.random.key_data(jax.random.key(tc.seed)))


def loss_fn(params, inputs, targets, config: GPTConfig, rng=None, weight: float = 1.0):
    """Mean next-token loss on a (micro-)batch, times `weight`; dropout when `rng` is given."""
    logits = apply(params, inputs, config, rng=rng, upcast_logits=False)
    return weight * cross_entropy(logits, targets, impl=config.loss_impl)


def make_train_step(config: GPTConfig, tc: TrainConfig,
                    optimizer: optax.GradientTransformation | None = None, *, jit: bool = True):
    """Build `train_step(state, inputs, targets) -> (state, metrics)`.

    metrics: `loss` (mean over the batch, before the update), `grad_norm`
    (global norm before clipping) and `lr` (the rate used for this step).
    With `jit=False` the plain function is returned, to wrap in a custom jit
    (with shardings, say).
    """
    optimizer = optimizer or make_optimizer(tc)
    schedule = lr_schedule(tc)
    accum = tc.grad_accum
    grad_fn = jax.value_and_grad(loss_fn)
    dropout = config.drop_rate > 0.0

    def train_step(state: TrainState, inputs, targets):
        b, t = inputs.shape
        if b % accum:
            raise ValueError(f"batch of {b} sequences does not divide into grad_accum={accum}")
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if accum == 1:
            loss, grads = grad_fn(state.params, inputs, targets, config, key if dropout else None)
        else:
            micro_in = inputs.reshape(accum, b // accum, t)
            micro_tg = targets.reshape(accum, b // accum, t)

            def one(carry, xs):
                loss_sum, grad_sum = carry
                i, x, y = xs
                k = jax.random.fold_in(key, i) if dropout else None
                # each micro-batch's share of the mean: the sums below are the
                # batch's loss and gradient, with no pass afterwards to divide them
                l, g = grad_fn(state.params, x, y, config, k, 1.0 / accum)
                return (loss_sum + l, jax.tree.map(jnp.add, grad_sum, g)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (loss, grads), _ = jax.lax.scan(one, (jnp.zeros((), jnp.float32), zeros),
                                            (jnp.arange(accum), micro_in, micro_tg))
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step)}
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return jax.jit(train_step, donate_argnums=0) if jit else train_step


def make_eval_step(config: GPTConfig, *, jit: bool = True):
    """Build `eval_step(params, inputs, targets) -> mean loss` (no dropout)."""
    def eval_step(params, inputs, targets):
        return loss_fn(params, inputs, targets, config)

    return jax.jit(eval_step) if jit else eval_step
