"""Training: optimizer, the jitted train and eval steps (and, around them, the loop)."""

from jaxllm.train.optim import TrainConfig, lr_schedule, make_optimizer, weight_decay_mask
from jaxllm.train.step import TrainState, init_train_state, make_eval_step, make_train_step

__all__ = ["TrainConfig", "lr_schedule", "make_optimizer", "weight_decay_mask", "TrainState",
           "init_train_state", "make_eval_step", "make_train_step"]
