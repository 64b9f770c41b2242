"""A GPT as a text classifier: the LM head replaced by a class head, pure functions.

The classifier's parameters are the model's tree with `out_head` removed and
a `class_head` {"kernel": (emb, n_classes), "bias": (n_classes,)} added
(`add_class_head`): a dictionary update, so every other leaf, and every
function of the model, stays as it is. The class logits read the hidden
states after the final LayerNorm at one position per row, or their mean:

- "last_token" (default): the last real token of each row (needs the row
  lengths, or a 0/1 pad mask, in the batch); right padding cannot move it;
- "last_position": the last position, a pad token for short rows (the
  book's chapter-6 protocol, kept for its replay);
- "mean": the mean over the real tokens.

`classify_task(pooling)` is a task for the engine's `make_train_step`: mean
cross-entropy over rows (a row's "weight" in the batch, default 1, scales
its loss; evaluation fills its last batch with weight-0 rows), with the count
of correct predictions as an aux sum. `trainable_for(name, config)` gives the
engine's `trainable` for the presets head / last_block / all, or a regex.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import GPTConfig
from jaxllm.model import apply, dense

HEAD = "class_head"
POOLINGS = ("last_token", "last_position", "mean")
TRAINABLE = ("head", "last_block", "all")  # the presets; any other string is a regex


def add_class_head(params, config: GPTConfig, n_classes: int, key: jax.Array):
    """The classifier's parameters: `params` without the LM head (`out_head`),
    with a new `class_head` initialised as PyTorch's `nn.Linear` is (uniform in
    +-1/sqrt(emb_dim), weights and bias), the head the book puts on GPT-2."""
    if isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) \
            or n_classes < 2:
        raise ValueError(f"a classifier needs n_classes >= 2, got {n_classes!r}")
    d = config.emb_dim
    bound = 1.0 / math.sqrt(d)
    k_w, k_b = jax.random.split(key)
    dtype = jnp.dtype(config.param_dtype)
    head = {"kernel": jax.random.uniform(k_w, (d, int(n_classes)), jnp.float32, -bound,
                                         bound).astype(dtype),
            "bias": jax.random.uniform(k_b, (int(n_classes),), jnp.float32, -bound,
                                       bound).astype(dtype)}
    out = {k: v for k, v in params.items() if k not in ("out_head", HEAD)}
    out[HEAD] = head
    return out


def n_classes_of(params) -> int:
    if HEAD not in params:
        raise ValueError(f"these parameters have no {HEAD!r}; add one with add_class_head")
    return int(params[HEAD]["bias"].shape[0])


def trainable_for(name: str, config: GPTConfig):
    """The engine's `trainable` for a preset, or `name` itself as a regex over
    parameter paths: "head" (the class head alone), "last_block" (the head, the
    last transformer block and the final LayerNorm: the book's choice) or "all"."""
    if name == "all":
        return None
    if name == "head":
        return rf"{HEAD}/.*"
    if name == "last_block":
        return rf"{HEAD}/.*|final_norm/.*|blocks/{config.n_layers - 1}/.*"
    if not isinstance(name, str) or not name:
        raise ValueError(f"trainable must be one of {TRAINABLE} or a regex, got {name!r}")
    return name


def _lengths(batch, seq: int):
    if "lengths" in batch:
        return jnp.asarray(batch["lengths"], jnp.int32)
    if "mask" in batch:  # 1 on real tokens: the last real one is at sum - 1 for right padding
        return jnp.asarray(batch["mask"], jnp.int32).sum(-1)
    raise ValueError("pooling needs the rows' real lengths: give batch['lengths'] (or a 0/1 "
                     "batch['mask'] over the tokens)")


def pool(hidden, batch, pooling: str = "last_token"):
    """(batch, emb) from the hidden states (batch, seq, emb)."""
    if pooling == "last_position":
        return hidden[:, -1]
    b, t = hidden.shape[:2]
    lengths = jnp.clip(_lengths(batch, t), 1, t)
    if pooling == "last_token":
        return jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    if pooling == "mean":
        real = (jnp.arange(t)[None, :] < lengths[:, None]).astype(hidden.dtype)
        return (hidden * real[..., None]).sum(1) / lengths[:, None].astype(hidden.dtype)
    raise ValueError(f"unknown pooling {pooling!r}; choose from {POOLINGS}")


def class_logits(params, batch, config: GPTConfig, *, pooling: str = "last_token", rng=None):
    """float32 logits (batch, n_classes) for batch["tokens"] (batch, seq). The
    head is a dense layer like every other (`jaxllm.model.dense`, in float32),
    so a LoRA adapter on it is applied, trained and merged as theirs are."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose from {POOLINGS}")
    if pooling != "last_position":
        _lengths(batch, 0)  # fails before the model runs when the batch cannot say
    hidden = apply(params, batch["tokens"], config, rng=rng, return_hidden=True)
    pooled = pool(hidden, batch, pooling).astype(jnp.float32)
    head = jax.tree.map(lambda a: a.astype(jnp.float32), params[HEAD])
    return dense(head, pooled)


@functools.lru_cache(maxsize=None)
def classify_task(pooling: str = "last_token"):
    """A task for `make_train_step` / `make_eval_step` over batches
    {"tokens", "labels", "lengths" (or "mask"), "weight"?}: the summed
    cross-entropy over rows, the rows' weight as the count, and "correct".
    One function per pooling, so that compiled steps are found again."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose from {POOLINGS}")

    def task(params, batch, config, rng=None):
        logits = class_logits(params, batch, config, pooling=pooling, rng=rng)
        labels = jnp.asarray(batch["labels"], jnp.int32)
        weight = jnp.asarray(batch.get("weight", jnp.ones(labels.shape)), jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return (nll * weight).sum(), weight.sum(), {"correct": (correct * weight).sum()}

    task.pooling = pooling
    return task


def accuracy(params, batches, config: GPTConfig, *, pooling: str = "last_token",
             eval_step=None) -> tuple[float, float]:
    """(accuracy, mean loss) over `batches` (weights respected), with a jitted
    eval step of `classify_task(pooling)` unless one is given."""
    if eval_step is None:
        from jaxllm.train.step import make_eval_step

        eval_step = make_eval_step(config, task=classify_task(pooling))
    sums = jax.device_get([eval_step(params, b) for b in batches])
    count = float(sum(s["count"] for s in sums))
    if count == 0:
        raise ValueError("no rows to score")
    return (float(sum(s["correct"] for s in sums)) / count,
            float(sum(s["loss_sum"] for s in sums)) / count)


def predict(params, config: GPTConfig, tokenizer, texts: Sequence[str], *, max_length: int,
            classes: Sequence[str], pooling: str = "last_token", pad_id: int = 50256,
            batch_size: int = 32) -> list[dict[str, Any]]:
    """{"label", "probability", "probabilities", "truncated"} for each text,
    tokenised and padded as in training (cut to `max_length`, and to the
    context; "truncated" says whether the text had more tokens than that)."""
    from jaxllm.data.classification import encode_texts, pad_rows

    if not texts:
        return []
    max_length = min(max_length, config.context_length)
    ids = encode_texts(texts, tokenizer)
    tokens, lengths, _ = pad_rows(ids, max_length, pad_id)
    fn = _logits_fn(config, pooling)
    out = []
    for start in range(0, len(texts), batch_size):
        tb, lb = tokens[start:start + batch_size], lengths[start:start + batch_size]
        n = len(tb)
        if n < batch_size and len(texts) > batch_size:  # one shape for every batch
            tb = np.concatenate([tb, np.repeat(tb[:1], batch_size - n, 0)])
            lb = np.concatenate([lb, np.repeat(lb[:1], batch_size - n, 0)])
        probs = np.asarray(jax.nn.softmax(fn(params, {"tokens": tb, "lengths": lb}), -1))[:n]
        for i, p in enumerate(probs, start):
            k = int(p.argmax())
            out.append({"label": classes[k], "probability": float(p[k]),
                        "probabilities": {c: float(q) for c, q in zip(classes, p)},
                        "truncated": len(ids[i]) > max_length})
    return out


_LOGITS_FNS: dict = {}


def _logits_fn(config: GPTConfig, pooling: str):
    key = (config, pooling)
    if key not in _LOGITS_FNS:
        _LOGITS_FNS[key] = jax.jit(lambda p, b: class_logits(p, b, config, pooling=pooling))
    return _LOGITS_FNS[key]
