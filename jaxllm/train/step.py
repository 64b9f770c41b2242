"""The jitted train and eval steps, generic over tasks and trainable parameters.

`train_step(state, batch)` does one optimizer step on a batch dict (see
`jaxllm.train.task`): it splits every array of the batch into `grad_accum`
micro-batches along the leading axis, sums the task's loss numerators,
counts and gradients over them in a `lax.scan`, divides once, then applies
the optimizer to the trainable leaves. The state is donated, so XLA updates
parameters and optimizer moments in place, and the step returns its metrics
as device arrays: nothing in it waits on the host. Dropout keys are derived
from (seed, step), so a resumed run draws the same masks as an
uninterrupted one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxllm.config import GPTConfig
from jaxllm.train.optim import TrainConfig, lr_schedule, make_optimizer
from jaxllm.train.task import (Task, Trainable, call_task, combine, lm_task, partition,
                               trainable_mask)


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: Any  # the whole tree, frozen leaves included
    opt_state: Any  # of the trainable subtree only
    rng: jax.Array  # base dropout key (raw uint32 data, so it saves like any array)


def init_train_state(params, tc: TrainConfig, optimizer: optax.GradientTransformation | None = None,
                     *, trainable: Trainable = None) -> TrainState:
    """A fresh state: the optimizer initialised on the trainable leaves alone."""
    optimizer = optimizer or make_optimizer(tc)
    train_params, _ = partition(params, trainable_mask(params, trainable))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(train_params),
                      rng=jax.random.key_data(jax.random.key(tc.seed)))


def _rows(batch) -> int:
    """The batch's row count: every array's leading axis, alike."""
    sizes = {k: jnp.shape(v)[0] if jnp.ndim(v) else None for k, v in batch.items()}
    b = next(iter(sizes.values()), None)
    if b is None or any(s != b for s in sizes.values()):
        raise ValueError(f"batch arrays differ in their leading (batch) size: {sizes}")
    return b


def _micro_batches(batch, accum: int):
    b = _rows(batch)
    if b % accum:
        raise ValueError(f"batch of {b} rows does not divide into grad_accum={accum}")
    return {k: v.reshape(accum, b // accum, *v.shape[1:]) for k, v in batch.items()}


def _check_state(state, optimizer, train_params) -> None:
    """The state's optimizer state must be the one `optimizer` builds for these
    trainable leaves (it is not when the state was made with another `trainable`)."""
    want = jax.tree.structure(jax.eval_shape(optimizer.init, train_params))
    if jax.tree.structure(state.opt_state) != want:
        raise ValueError("the train state's optimizer state does not fit this step: build the "
                         "state and the step with the same trainable set and optimizer "
                         "(init_train_state(params, tc, optimizer, trainable=...))")


def make_train_step(config: GPTConfig, tc: TrainConfig,
                    optimizer: optax.GradientTransformation | None = None, *,
                    task: Task = lm_task, trainable: Trainable = None, jit: bool = True):
    """Build `train_step(state, batch) -> (state, metrics)`.

    metrics: `loss` (the batch's summed loss over its count, before the
    update), `count`, `grad_norm` (global norm of the trainable gradients,
    before clipping), `lr` (the schedule's rate for this step) and the task's
    `aux` sums. `trainable` must be the one the state was built with. With
    `jit=False` the plain function is returned, to wrap in a custom jit
    (with shardings, say).
    """
    optimizer = optimizer or make_optimizer(tc)
    schedule = lr_schedule(tc)
    accum = tc.grad_accum
    dropout = config.drop_rate > 0.0

    def task_loss(train_params, frozen, batch, rng, divisor):
        loss_sum, count, aux = call_task(task, combine(train_params, frozen), batch, config, rng)
        loss_sum = jnp.asarray(loss_sum, jnp.float32)
        count = jax.lax.stop_gradient(jnp.asarray(count, jnp.float32))
        # a batch where nothing counts has loss 0, not 0 / 0
        scaled = loss_sum / (jnp.maximum(count, 1e-30) if divisor is None else divisor)
        return scaled, (loss_sum, count, aux)

    grad_fn = jax.value_and_grad(task_loss, has_aux=True)

    def train_step(state: TrainState, batch):
        mask = trainable_mask(state.params, trainable)
        train_params, frozen = partition(state.params, mask)
        _check_state(state, optimizer, train_params)
        key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        if accum == 1:
            _rows(batch)
            # the gradient of the mean itself: no pass over the gradients afterwards
            (loss, (_, count, aux)), grads = grad_fn(train_params, frozen, batch,
                                                     key if dropout else None, None)
        else:
            micro = _micro_batches(batch, accum)

            def one(carry, xs):
                i, mb = xs
                k = jax.random.fold_in(key, i) if dropout else None
                (_, (s, c, a)), g = grad_fn(train_params, frozen, mb, k, 1.0)
                sums = jax.tree.map(jnp.add, carry, (s, c, a, g))
                return sums, None

            first = jax.tree.map(lambda x: x[0], micro)
            _, (s0, c0, a0) = jax.eval_shape(task_loss, train_params, frozen, first, None, 1.0)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (s0, c0, a0))
            zeros = (*zeros, jax.tree.map(jnp.zeros_like, train_params))
            (loss_sum, count, aux, grads), _ = jax.lax.scan(one, zeros, (jnp.arange(accum), micro))
            # numerators and counts summed over the micro-batches, divided once
            inv = 1.0 / jnp.maximum(count, 1e-30)
            loss = loss_sum * inv
            grads = jax.tree.map(lambda g: (g * inv).astype(g.dtype), grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, train_params)
        params = combine(optax.apply_updates(train_params, updates), frozen)
        metrics = {"loss": loss, "count": count, "grad_norm": grad_norm,
                   "lr": schedule(state.step), **aux}
        return TrainState(state.step + 1, params, opt_state, state.rng), metrics

    return jax.jit(train_step, donate_argnums=0) if jit else train_step


def make_eval_step(config: GPTConfig, *, task: Task = lm_task, jit: bool = True):
    """Build `eval_step(params, batch) -> {"loss_sum", "count", **aux}` (no dropout):
    sums, so that a whole evaluation set's mean is the sum of sums over the sum
    of counts."""
    def eval_step(params, batch):
        loss_sum, count, aux = call_task(task, params, batch, config)
        return {"loss_sum": jnp.asarray(loss_sum, jnp.float32),
                "count": jnp.asarray(count, jnp.float32), **aux}

    return jax.jit(eval_step) if jit else eval_step
