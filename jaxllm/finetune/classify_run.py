"""The classification run: labelled texts in, a classifier and its accuracies out.

`finetune_classify(...)` runs the one loop (`jaxllm.train.loop`) with
`classify_task` over the seeded training batches of a `ClassificationData`,
the LM head replaced by a class head:

- at step 0, every `eval_every` steps and at the end, loss and accuracy on
  the first `eval_batches` training and validation batches;
- checkpoints whose metadata holds the classes, pooling and padding, so
  `load_classifier` / `jaxllm classify` can use them;
- with `keep_best`, at each evaluation that beats every earlier one in
  validation accuracy, the parameters in `<run_dir>/best/` (a run folder of
  one checkpoint that `jaxllm classify --run-dir` reads);
- after training, accuracy and loss on the whole train, validation and test
  splits (and of the best checkpoint's, with `keep_best`); `loss.png` and
  `accuracy.png` (train and validation against examples seen) and
  `summary.json`.

The loop does the rest: logging, NaN stops, the run-folder lock, bitwise
resume, a device mesh.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jaxllm.config import GPTConfig
from jaxllm.data.classification import ClassificationBatches, ClassificationData, fixed_batches
from jaxllm.finetune.classify import (HEAD, POOLINGS, add_class_head, classify_task, predict,
                                      trainable_for)
from jaxllm.layout import check_params
from jaxllm.lora import trainable_label
from jaxllm.model import init_params
from jaxllm.train import checkpoint
from jaxllm.train.loop import Means, open_run
from jaxllm.train.optim import TrainConfig
from jaxllm.train.plot import common_batch_count, plot_metric
from jaxllm.train.step import TrainState
from jaxllm.train.task import count_trainable

META_KIND = "classify"
BEST_SUBDIR = "best"  # keep_best's run folder inside the run's


@dataclasses.dataclass(frozen=True)
class ClassifyConfig:
    """Model head, evaluation and checkpoint settings of a classification run."""

    pooling: str = "last_token"  # see jaxllm.finetune.classify
    trainable: str = "last_block"  # head / last_block / all, or a regex over parameter paths
    eval_every: int = 50
    eval_batches: int = 5  # batches of each split per evaluation
    log_every: int = 10
    save_every: int = 500
    keep: int = 2  # checkpoints kept
    keep_best: bool = False  # also keep the parameters of the best validation accuracy

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"ClassifyConfig.pooling must be one of {POOLINGS}, "
                             f"got {self.pooling!r}")
        if not isinstance(self.keep_best, bool):
            raise ValueError(f"ClassifyConfig.keep_best must be true or false, got "
                             f"{self.keep_best!r}")
        for name in ("eval_every", "eval_batches", "log_every", "save_every", "keep"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"ClassifyConfig.{name} must be a positive int, got {v!r}")


@dataclasses.dataclass(frozen=True)
class WithClassHead:
    """The starting tree: the given parameters (or `init_params`) with a fresh
    class head of `n_classes` in place of the LM head, unless they carry one."""

    config: GPTConfig
    scheme: str
    n_classes: int

    def __call__(self, key, params):
        k_model, k_head = jax.random.split(key)
        if params is None:
            params = init_params(self.config, k_model, scheme=self.scheme)
        if HEAD not in params:
            params = add_class_head(params, self.config, self.n_classes, k_head)
        return params


def plot_curves(records: list[dict[str, Any]], run_dir: Path, *, examples_per_epoch: int,
                title: str, eval_batches: int | None = None) -> None:
    """loss.png and accuracy.png: per step and at each evaluation (on
    `eval_batches` batches of each split, not the whole splits that
    summary.json scores), against examples seen (epochs on top)."""
    for key, ylabel in (("loss", "loss (cross-entropy)"), ("accuracy", "accuracy")):
        plot_metric(records, run_dir / f"{key}.png", key=key, x="examples",
                    xlabel="examples seen", ylabel=ylabel, per_epoch=examples_per_epoch,
                    eval_batches=eval_batches, title=title)


def finetune_classify(run_dir, config: GPTConfig, tc: TrainConfig, cc: ClassifyConfig,
                      data: ClassificationData, *, tokenizer_name: str,
                      tokenizer_dir: str | None = None, params=None,
                      resume: bool = False, progress: bool = True, data_name: str = "data",
                      source: str = "random", stop_at: int | None = None,
                      fallback: bool = True, lora: dict | None = None,
                      mesh: jax.sharding.Mesh | None = None,
                      partition_rules=None) -> dict[str, Any]:
    """Fine-tune (or resume) the classifier in `run_dir`; returns the summary.

    `params` are the starting weights: a model tree (its LM head is replaced),
    a classifier tree (kept), or None for `init_params(config)`. They are
    donated to the train step. `source` says where they came from (for the
    record), `tokenizer_dir` the folder of the tokenizer's files (later commands
    on the run find them there); `stop_at` ends the run early at that step,
    saving there. `lora` records the settings of the adapters `params` carry
    in the run's metadata. With a `mesh` the batch is split over its devices
    and the state sharded (by `partition_rules`, default
    `jaxllm.sharding.DEFAULT_RULES`; see `jaxllm.train.loop.open_run`).
    """
    run_dir, wall_start = Path(run_dir), time.perf_counter()
    n_classes = len(data.classes)
    if params is not None and HEAD in params and params[HEAD]["bias"].shape[0] != n_classes:
        raise ValueError(f"the starting classifier has {params[HEAD]['bias'].shape[0]} classes "
                         f"but the data has {n_classes}: {data.classes}")
    if not len(data.validation):
        raise ValueError("the validation split is empty; give more rows or a larger fraction")
    if params is not None:
        # a classifier's class head replaced the LM head
        check_params(params, config, skip=("out_head/",) if HEAD in params else ())
    trainable = trainable_for(cc.trainable, config)
    batches = ClassificationBatches(data.train, tc.batch_size, seed=tc.seed)
    train_eval = fixed_batches(data.train, tc.batch_size, cc.eval_batches)
    val_eval = fixed_batches(data.validation, tc.batch_size, cc.eval_batches)
    identity = {"model": config.to_dict(), "train": dataclasses.asdict(tc),
                "tokenizer": tokenizer_name, "classify": dataclasses.asdict(cc),
                "classes": list(data.classes), "max_length": data.max_length,
                "data": {k: data.info.get(k)
                         for k in ("train", "validation", "test", "seed", "sha256")}}
    meta = dict(data_name=data_name, source=source, tokenizer_dir=tokenizer_dir,
                pad_id=data.info.get("pad_id", 50256))
    if lora is not None:
        meta["lora"] = lora
    best_dir = run_dir / BEST_SUBDIR
    best: dict[str, Any] | None = None
    first_best = True

    def keep_best(params, step: int, record: dict[str, Any]) -> dict[str, Any]:
        """The parameters alone (no optimizer state) as `best/`'s one checkpoint,
        at an evaluation that beats every earlier one; a resumed run reaching a
        step `best/` holds finds the same parameters."""
        nonlocal best, first_best
        if first_best:  # the evaluations logged before this process's first
            first_best = False
            if step == 0:
                shutil.rmtree(best_dir, ignore_errors=True)  # a fresh run: an earlier run's goes
            earlier = [r for r in run.log.read() if r["kind"] == "eval"]
            best = max(earlier, key=lambda r: r["val_accuracy"], default=None)
        if best is not None and record["val_accuracy"] <= best["val_accuracy"]:
            return {}
        best = record
        manager = checkpoint.open_manager(best_dir, keep=1, create=True)
        try:
            if step not in manager.all_steps():
                checkpoint.save(manager, TrainState(jnp.int32(step), params, None,
                                                    jnp.zeros(2, jnp.uint32)),
                                dict(run.meta, best_of=str(run_dir),
                                     val_accuracy=record["val_accuracy"]))
        finally:
            manager.close()
        return {}

    def describe(r: dict[str, Any]) -> str:
        return (f"step {r['step']}: train loss {r['train_loss']:.3f}, val loss "
                f"{r['val_loss']:.3f}; accuracy train {r['train_accuracy']:.1%}, val "
                f"{r['val_accuracy']:.1%}")

    def finish(records: list[dict[str, Any]]) -> None:
        plot_curves(records, run_dir,
                    examples_per_epoch=batches.batches_per_epoch * tc.batch_size,
                    title=f"{data_name}: {config.n_layers} layers, emb {config.emb_dim}, "
                          f"{cc.trainable}, {cc.pooling}",
                    eval_batches=common_batch_count(train_eval, val_eval))

    evaluations = {"train": Means(train_eval), "val": Means(val_eval)}
    if cc.keep_best:
        evaluations["best"] = keep_best
    with open_run(run_dir, config, tc, identity=identity, kind=META_KIND,
                  task=classify_task(cc.pooling), params=params,
                  start=WithClassHead(config, tc.init, n_classes), trainable=trainable,
                  mesh=mesh, partition_rules=partition_rules, resume=resume,
                  fallback=fallback, keep=cc.keep,
                  metric_names={"correct": "accuracy"}) as run:
        done = run.fit(batches, meta=meta, evaluations=evaluations, log_every=cc.log_every,
                       eval_every=cc.eval_every, save_every=cc.save_every, unit="examples",
                       stop_at=stop_at, describe=describe, finish=finish, progress=progress)

        def whole_splits(params) -> dict[str, dict[str, float]]:
            names = [name for name, split in data.splits().items() if len(split)]
            return dict(zip(names, run.means(params, *(
                fixed_batches(data.splits()[name], tc.batch_size) for name in names))))

        state = done.state
        final = whole_splits(state.params)
        if cc.keep_best:  # the best evaluation of the whole run; its parameters as the final
            evals = [r for r in done.records if r["kind"] == "eval"]
            best = max(evals, key=lambda r: r["val_accuracy"], default=None)
        if best is not None:
            best_final = whole_splits(checkpoint.load_params(best_dir)[0])
    n_total = sum(int(x.size) for x in jax.tree.leaves(state.params))
    summary = {
        "run_dir": str(run_dir), "source": source, "data": data_name,
        "classes": list(data.classes), "pooling": cc.pooling, "trainable": cc.trainable,
        "trainable_params": count_trainable(state.params, trainable), "total_params": n_total,
        "steps": int(state.step), "resumed_from": run.resumed_from,
        "epochs": int(state.step) / batches.batches_per_epoch, "examples_seen": done.seen,
        "rows": {k: data.info[k] for k in ("train", "validation", "test")},
        "max_length": data.max_length,
        "train_wall_s": done.wall_s, "compile_s": done.timing.compile_s,
        "examples_per_s": (done.steps_per_s * tc.batch_size if done.steps_per_s else None),
        "initial_val_accuracy": (done.first_eval["val_accuracy"] if done.first_eval
                                 else None),
        "accuracy": {k: v["accuracy"] for k, v in final.items()},
        "loss": {k: v["loss"] for k, v in final.items()},
        "last_checkpoint": done.last_saved, "wall_s": time.perf_counter() - wall_start,
    }
    if best is not None:
        summary["best"] = {"step": best["step"], "run_dir": str(best_dir),
                           "eval_val_accuracy": best["val_accuracy"],
                           "accuracy": {k: v["accuracy"] for k, v in best_final.items()},
                           "loss": {k: v["loss"] for k, v in best_final.items()}}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def format_summary(s: dict[str, Any]) -> str:
    acc = s["accuracy"]
    lines = [f"fine-tuned {s['steps']} steps ({s['epochs']:.2f} epochs, {s['examples_seen']:,} "
             f"examples) in {s['train_wall_s']:.1f} s; {s['trainable_params']:,} of "
             f"{s['total_params']:,} parameters trained ({trainable_label(s['trainable'])}, "
             f"{s['pooling']} pooling)",
             "accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in acc.items())
             + "  (loss: " + ", ".join(f"{k} {v:.3f}" for k, v in s["loss"].items()) + ")"]
    if s.get("examples_per_s"):
        lines.append(f"speed: {s['examples_per_s']:.1f} examples/s after "
                     f"{s['compile_s']:.1f} s of compilation")
    if s.get("best"):
        b = s["best"]
        lines.append(f"best validation accuracy at step {b['step']} (of the evaluations), kept in "
                     f"{b['run_dir']}: " + ", ".join(f"{k} {v:.1%}"
                                                     for k, v in b["accuracy"].items()))
    lines.append(f"wrote {s['run_dir']}/: metrics.jsonl, loss.png, accuracy.png, summary.json, "
                 f"checkpoints/{s['last_checkpoint']}" + (", best/" if s.get("best") else ""))
    return "\n".join(lines)


# -- inference from a run folder --------------------------------------------------
def load_classifier(run_dir: str | os.PathLike, step: int | None = None, *,
                    fallback: bool = True) -> dict[str, Any]:
    """{"params", "config", "meta"} of a classification run's checkpoint (the
    newest that reads when `step` is None, or with `fallback=False` the newest
    or an error); only the parameters are read, as saved (adapters included)."""
    params, meta = checkpoint.load_params_and_meta(run_dir, step, fallback=fallback)
    if meta.get("kind") != META_KIND:
        raise ValueError(f"{run_dir} is not a classification run (its checkpoint is of kind "
                         f"{meta.get('kind', 'pretrain')!r}); give a run of jaxllm finetune "
                         f"classify")
    return {"params": params, "config": GPTConfig.from_dict(meta["model"]), "meta": meta}


def classify_texts(run_dir: str | os.PathLike, texts, *, tokenizer_dir=None,
                   classifier: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The label and its probability for each text, from a classification run
    (its tokenizer from `tokenizer_dir`, else where the run found it)."""
    from jaxllm.tokenizer import get_tokenizer, recorded_places

    clf = classifier or load_classifier(run_dir)
    meta = clf["meta"]
    tokenizer = get_tokenizer(meta["tokenizer"], tokenizer_dir,
                              places=recorded_places(meta, run_dir))
    return predict(clf["params"], clf["config"], tokenizer, list(texts),
                   max_length=meta["max_length"], classes=meta["classes"],
                   pooling=meta["classify"]["pooling"], pad_id=meta.get("pad_id", 50256))


__all__ = ["ClassifyConfig", "finetune_classify", "format_summary", "load_classifier",
           "classify_texts", "plot_curves"]
