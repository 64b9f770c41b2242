"""Training: tasks, the optimizer, the jitted train and eval steps (and, around them, the loop)."""

from jaxllm.train.optim import TrainConfig, lr_schedule, make_optimizer, weight_decay_mask
from jaxllm.train.step import TrainState, init_train_state, make_eval_step, make_train_step
from jaxllm.train.task import (combine, count_trainable, lm_batch, lm_task, partition,
                               trainable_mask)

__all__ = ["TrainConfig", "lr_schedule", "make_optimizer", "weight_decay_mask", "TrainState",
           "init_train_state", "make_eval_step", "make_train_step", "lm_task", "lm_batch",
           "trainable_mask", "partition", "combine", "count_trainable"]
