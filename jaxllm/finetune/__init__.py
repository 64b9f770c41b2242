"""Fine-tuning a pretrained GPT, each on the one training loop (`jaxllm.train.loop`):
classification (`classify`: the head and task; `classify_run`: the run), instruction
following (`instruct`, `instruct_run`) and preference tuning (`dpo`, `dpo_run`)."""

from jaxllm.finetune.classify import (HEAD, POOLINGS, TRAINABLE, accuracy, add_class_head,
                                      class_logits, classify_task, pool, predict, trainable_for)

__all__ = ["HEAD", "POOLINGS", "TRAINABLE", "accuracy", "add_class_head", "class_logits",
           "classify_task", "pool", "predict", "trainable_for"]
