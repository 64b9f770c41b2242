"""Fine-tuning a pretrained GPT for a task: classification (`classify`, `loop`) and
instruction following (`instruct`, `instruct_loop`)."""

from jaxllm.finetune.classify import (HEAD, POOLINGS, TRAINABLE, accuracy, add_class_head,
                                      class_logits, classify_task, pool, predict, trainable_for)

__all__ = ["HEAD", "POOLINGS", "TRAINABLE", "accuracy", "add_class_head", "class_logits",
           "classify_task", "pool", "predict", "trainable_for"]
