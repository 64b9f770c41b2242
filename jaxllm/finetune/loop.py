"""The classification fine-tuning loop: labelled texts in, a classifier and its accuracies out.

`finetune_classify(...)` runs `TrainConfig.total_steps` steps of the engine's
jitted train step with `classify_task` over the seeded training batches of a
`ClassificationData`, and around them:

- every `log_every` steps, the pending step metrics (loss, batch accuracy)
  to `metrics.jsonl` and the tqdm bar; a non-finite loss stops the run;
- at step 0, every `eval_every` steps and at the end, loss and accuracy on
  the first `eval_batches` training and validation batches;
- every `save_every` steps and at the end, an Orbax checkpoint (the engine's
  `jaxllm.train.checkpoint`) whose metadata holds the classes, pooling and
  padding, so `load_classifier` / `jaxllm classify` can use it;
- with `keep_best`, at each evaluation that beats every earlier one in
  validation accuracy, the parameters in `<run_dir>/best/` (a run folder of
  one checkpoint that `jaxllm classify --run-dir` reads);
- after training, accuracy and loss on the whole train, validation and test
  splits (and of the best checkpoint's, with `keep_best`); `loss.png` and
  `accuracy.png` (train and validation against examples seen) and
  `summary.json`.

Batch k is a function of k and the seed, so `resume=True` continues from the
last checkpoint and writes what an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from tqdm.auto import tqdm

from jaxllm.config import GPTConfig
from jaxllm.data.classification import ClassificationBatches, ClassificationData, fixed_batches
from jaxllm.finetune.classify import (HEAD, POOLINGS, add_class_head, classify_task, predict,
                                      trainable_for)
from jaxllm.layout import check_params
from jaxllm.lora import trainable_label
from jaxllm.model import init_params
from jaxllm.train import checkpoint
from jaxllm.train.lock import run_lock
from jaxllm.train.loop import TrainingDiverged
from jaxllm.train.metrics import MetricsLog
from jaxllm.train.optim import TrainConfig, make_optimizer
from jaxllm.train.plot import common_batch_count, plot_metric
from jaxllm.train.step import TrainState, init_train_state, make_eval_step, make_train_step
from jaxllm.train.runner import check_run_folder, run_steps, start_or_resume
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


@functools.lru_cache(maxsize=4)
def _programs(config: GPTConfig, tc: TrainConfig, cc: ClassifyConfig, n_classes: int):
    """(optimizer, trainable regex, init, train step, eval step), compiled once per
    configuration: a resumed run in the same process reuses them."""
    optimizer = make_optimizer(tc)
    trainable = trainable_for(cc.trainable, config)
    task = classify_task(cc.pooling)

    def init(key, params):
        k_model, k_head = jax.random.split(key)
        if params is None:
            params = init_params(config, k_model, scheme=tc.init)
        if HEAD not in params:
            params = add_class_head(params, config, n_classes, k_head)
        return init_train_state(params, tc, optimizer, trainable=trainable)

    return (optimizer, trainable, jax.jit(init),
            make_train_step(config, tc, optimizer, task=task, trainable=trainable),
            make_eval_step(config, task=task))


def _sums(eval_step, params, batches) -> dict[str, float]:
    sums = jax.device_get([eval_step(params, b) for b in batches])
    count = float(sum(s["count"] for s in sums))
    return {"loss": float(sum(s["loss_sum"] for s in sums)) / max(count, 1e-30),
            "accuracy": float(sum(s["correct"] for s in sums)) / max(count, 1e-30),
            "rows": int(count)}


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
                      fallback: bool = True, lora: dict | None = None) -> dict[str, Any]:
    """Fine-tune (or resume) the classifier in `run_dir`; returns the summary.

    `params` are the starting weights: a model tree (its LM head is replaced),
    a classifier tree (kept), or None for `init_params(config)`. They are
    donated to the train step. `source` says where they came from (for the
    record), `tokenizer_dir` the folder of the tokenizer's files (later commands
    on the run find them there); `stop_at` ends the run early at that step,
    saving there. `lora` records the settings of the adapters `params` carry
    in the run's metadata.
    """
    run_dir = Path(run_dir)
    check_run_folder(run_dir, resume=resume, kind=META_KIND)
    with run_lock(run_dir):
        return _run(run_dir, config, tc, cc, data, tokenizer_name, params, resume, progress,
                    data_name, source, stop_at, fallback, tokenizer_dir, lora)


def _run(run_dir, config, tc, cc, data, tokenizer_name, params, resume, progress, data_name,
         source, stop_at, fallback, tokenizer_dir=None, lora=None):
    n_classes = len(data.classes)
    if params is not None and HEAD in params and params[HEAD]["bias"].shape[0] != n_classes:
        raise ValueError(f"the starting classifier has {params[HEAD]['bias'].shape[0]} classes "
                         f"but the data has {n_classes}: {data.classes}")
    optimizer, trainable, init, train_step, eval_step = _programs(config, tc, cc, n_classes)
    batches = ClassificationBatches(data.train, tc.batch_size, seed=tc.seed)
    train_eval = fixed_batches(data.train, tc.batch_size, cc.eval_batches)
    val_eval = fixed_batches(data.validation, tc.batch_size, cc.eval_batches)
    if not len(data.validation):
        raise ValueError("the validation split is empty; give more rows or a larger fraction")

    identity = {"model": config.to_dict(), "train": dataclasses.asdict(tc),
                "tokenizer": tokenizer_name, "classify": dataclasses.asdict(cc),
                "classes": list(data.classes), "max_length": data.max_length,
                "data": {k: data.info.get(k)
                         for k in ("train", "validation", "test", "seed", "sha256")}}
    meta = dict(identity, kind=META_KIND, data_name=data_name, source=source,
                tokenizer_dir=tokenizer_dir, pad_id=data.info.get("pad_id", 50256),
                batches_per_epoch=batches.batches_per_epoch)
    if lora is not None:
        meta["lora"] = lora
    manager = checkpoint.open_manager(run_dir, keep=cc.keep, create=True)
    log = MetricsLog(run_dir)
    if params is not None:
        # a classifier's class head replaced the LM head
        check_params(params, config, skip=("out_head/",) if HEAD in params else ())
    state, latest, saved, changes = start_or_resume(run_dir, manager, identity, init, params,
                                                    seed=tc.seed, resume=resume,
                                                    fallback=fallback)
    start, examples = int(state.step), int(saved.get("examples_seen", 0))
    if latest is None:
        log.clear()
    else:
        log.truncate_after(start)
    if changes:  # a longer run than the checkpoint's: its schedule's new total, recorded
        meta["schedule_changes"] = changes
    (run_dir / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    end = tc.total_steps if stop_at is None else min(stop_at, tc.total_steps)
    last_saved = latest
    n_trainable = count_trainable(state.params, trainable)
    n_total = sum(int(x.size) for x in jax.tree.leaves(state.params))
    best_dir = run_dir / BEST_SUBDIR
    earlier = [r for r in log.read() if r["kind"] == "eval"]  # a resumed run's, up to its step
    best = max(earlier, key=lambda r: r["val_accuracy"], default=None) if cc.keep_best else None
    if cc.keep_best and latest is None:
        shutil.rmtree(best_dir, ignore_errors=True)  # a fresh run: an earlier run's best goes

    def evaluate(params, step: int) -> dict[str, Any]:
        tr, va = _sums(eval_step, params, train_eval), _sums(eval_step, params, val_eval)
        record = {"kind": "eval", "step": step, "examples": examples,
                  "train_loss": tr["loss"], "val_loss": va["loss"],
                  "train_accuracy": tr["accuracy"], "val_accuracy": va["accuracy"]}
        log.append([record])
        tqdm.write(f"step {step}: train loss {tr['loss']:.3f}, val loss {va['loss']:.3f}; "
                  f"accuracy train {tr['accuracy']:.1%}, val {va['accuracy']:.1%}")
        if cc.keep_best and (best is None or va["accuracy"] > best["val_accuracy"]):
            keep_best(params, record)
        return record

    def keep_best(params, record: dict[str, Any]) -> None:
        """The parameters alone (no optimizer state) as `best/`'s one checkpoint;
        a resumed run reaching a step `best/` holds finds the same parameters."""
        nonlocal best
        best = record
        manager = checkpoint.open_manager(best_dir, keep=1, create=True)
        try:
            if record["step"] not in manager.all_steps():
                checkpoint.save(manager, TrainState(jnp.int32(record["step"]), params, None,
                                                    jnp.zeros(2, jnp.uint32)),
                                dict(meta, best_of=str(run_dir),
                                     val_accuracy=record["val_accuracy"]))
        finally:
            manager.close()

    def save(state, step: int) -> None:
        nonlocal last_saved
        checkpoint.save(manager, state, dict(meta, data_position=step, examples_seen=examples))
        last_saved = step

    def record(step: int, m) -> dict[str, Any]:
        nonlocal examples
        examples += int(m["count"])
        return {"kind": "train", "step": step, "examples": examples, "loss": float(m["loss"]),
                "accuracy": float(m["correct"]) / max(float(m["count"]), 1.0),
                "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"])}

    def diverged(step: int, loss: float) -> TrainingDiverged:
        where = (f"the last good checkpoint is step {last_saved}"
                 if last_saved is not None else "no checkpoint was saved")
        return TrainingDiverged(f"training diverged: loss is {loss} at step {step} ({where})",
                                step, last_saved)

    wall_start = time.perf_counter()
    try:
        state, timing, first_eval = run_steps(
            state, train_step, batches.batch_at, start=start, end=end, log_every=cc.log_every,
            eval_every=cc.eval_every, save_every=cc.save_every, record=record,
            evaluate=evaluate, save=save, log=log, diverged=diverged, progress=progress,
            run_dir=run_dir)
    finally:
        manager.close()
        records = log.read()
        if records:
            plot_curves(records, run_dir, examples_per_epoch=batches.batches_per_epoch
                        * tc.batch_size,
                        title=f"{data_name}: {config.n_layers} layers, emb {config.emb_dim}, "
                              f"{cc.trainable}, {cc.pooling}",
                        eval_batches=common_batch_count(train_eval, val_eval))
    wall_train = time.perf_counter() - wall_start

    def whole_splits(params) -> dict[str, dict[str, float]]:
        return {name: _sums(eval_step, params, fixed_batches(split, tc.batch_size))
                for name, split in data.splits().items() if len(split)}

    final = whole_splits(state.params)
    if best is not None:  # the kept parameters, scored as the final ones are
        best_final = whole_splits(checkpoint.load_params(best_dir)[0])
    evals = [r for r in records if r["kind"] == "eval"]
    first_eval = first_eval or (evals[0] if evals else None)
    train_time, compile_s, timed_steps = timing.train_s, timing.compile_s, timing.timed_steps
    steps_timed_s = train_time if timed_steps else None
    summary = {
        "run_dir": str(run_dir), "source": source, "data": data_name,
        "classes": list(data.classes), "pooling": cc.pooling, "trainable": cc.trainable,
        "trainable_params": n_trainable, "total_params": n_total,
        "steps": int(state.step), "resumed_from": latest,
        "epochs": int(state.step) / batches.batches_per_epoch, "examples_seen": examples,
        "rows": {k: data.info[k] for k in ("train", "validation", "test")},
        "max_length": data.max_length,
        "train_wall_s": wall_train, "compile_s": compile_s,
        "examples_per_s": (timed_steps * tc.batch_size / steps_timed_s
                           if steps_timed_s else None),
        "initial_val_accuracy": first_eval["val_accuracy"] if first_eval else None,
        "accuracy": {k: v["accuracy"] for k, v in final.items()},
        "loss": {k: v["loss"] for k, v in final.items()},
        "last_checkpoint": last_saved, "wall_s": time.perf_counter() - wall_start,
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
