"""The DPO run: preference pairs in, a model that prefers the chosen answers, its answers out.

`finetune_dpo(...)` runs the one loop (`jaxllm.train.loop`) with
`jaxllm.finetune.dpo.dpo_task` over the seeded, resumable `PreferenceBatches`:

- before the first step, the reference's sequence log-probabilities of every
  pair (train, validation, test) in one pass (`reference_logprobs`: the
  starting weights, or with LoRA the same weights with the adapters off),
  kept in the run folder (`reference.npz`) so a resumed run reads them;
- each step's metrics: the loss, the chosen and rejected rewards, the margin
  and the reward accuracy;
- at step 0, every `eval_every` steps and at the end, the same five over the
  first `eval_batches` training and validation batches, and greedy answers
  to the first `sample_count` validation prompts (`samples.txt`);
- after training, the five over the whole test split, and a greedy answer to
  every test prompt next to its chosen and rejected answers (`responses.json`);
  `loss.png` (a panel per metric), `summary.json` with steps/s and peak memory.

The loop does the rest: logging, NaN stops, checkpoints, the run-folder
lock, bitwise resume (the reference values are read back from the run), a
device mesh.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from jaxllm.config import GPTConfig
from jaxllm.data.preferences import PreferenceBatches, fixed_pair_batches, tokenize_pairs
from jaxllm.finetune.dpo import REDUCTIONS, dpo_task, reference_logprobs
from jaxllm.finetune.instruct import generate_responses
from jaxllm.finetune.instruct_run import (AnswerConfig, answer_run_record, answer_samples,
                                          answer_splits)
from jaxllm.layout import check_params
from jaxllm.train.loop import Means, open_run
from jaxllm.train.optim import TrainConfig
from jaxllm.train.task import Trainable, count_trainable

META_KIND = "dpo"
REFERENCE_FILE = "reference.npz"
METRICS = ("loss", "chosen_reward", "rejected_reward", "reward_margin", "reward_accuracy")


@dataclasses.dataclass(frozen=True)
class DPOConfig(AnswerConfig):
    """The DPO loss, data, evaluation, checkpoint and response settings of a run
    (weight decay is `TrainConfig.weight_decay_on`'s, as in every run)."""

    beta: float = 0.1
    logprob: str = "mean"  # "mean" (the book; rewards without beta) or "sum" (TRL; with beta)
    book_collate: bool = False  # the book's sequences and masks exactly (no end-of-text)

    def __post_init__(self) -> None:
        dpo_task(self.beta, self.logprob)  # names a bad beta or convention
        super().__post_init__()
        if self.book_collate and self.style != "alpaca":
            raise ValueError("the book's collate (book_collate) needs the alpaca style")


def peak_memory_bytes() -> dict[str, int | None]:
    """The accelerator's peak bytes in use (None where the backend keeps no
    count, as on CPU) and this process's peak resident memory."""
    stats = jax.devices()[0].memory_stats() or {}
    return {"device_peak_bytes": stats.get("peak_bytes_in_use"),
            "host_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def finetune_dpo(run_dir, config: GPTConfig, tc: TrainConfig, dc: DPOConfig, tokenizer,
                 entries: Sequence[dict], *, params=None, resume: bool = False,
                 progress: bool = True, data_name: str = "preferences", source: str = "random",
                 stop_at: int | None = None, fallback: bool = True,
                 trainable: Trainable = None, lora: dict | None = None,
                 mesh: jax.sharding.Mesh | None = None,
                 partition_rules=None) -> dict[str, Any]:
    """DPO-tune (or resume) the run in `run_dir` on preference `entries`; returns the summary.

    `entries` are split 85 / 10 / rest (train / test / validation, in file
    order). `params` are the starting weights, which are also the reference
    (default: `init_params(config)`; with LoRA adapters in them, the reference
    is the weights without the adapters); they are donated to the train step.
    `trainable` selects the leaves that train (default all; `jaxllm.lora.TRAINABLE`
    for adapters) and `lora` records the adapters' settings in the run's
    metadata. `stop_at` ends the run early at that step, saving there.
    `fallback=False` refuses a damaged latest checkpoint on resume. With a
    `mesh` the batch is split over its devices and the state sharded (by
    `partition_rules`, default `jaxllm.sharding.DEFAULT_RULES`).
    """
    run_dir, wall_start = Path(run_dir), time.perf_counter()
    train_entries, test_entries, val_entries = answer_splits(entries, tokenizer, config)
    collate_kw = dict(allowed_max_length=min(dc.allowed_max_length, config.context_length),
                      pad_multiple=dc.pad_multiple, pad_id=tokenizer.eot_id)
    splits = {name: tokenize_pairs(e, tokenizer, dc.style, book=dc.book_collate)
              for name, e in (("train", train_entries), ("validation", val_entries),
                              ("test", test_entries))}
    if len(splits["train"]) < tc.batch_size:
        raise ValueError(f"{len(splits['train'])} training pairs are fewer than one batch of "
                         f"{tc.batch_size}")
    if params is not None:
        check_params(params, config)
    identity, meta = answer_run_record(
        "dpo", dc, config, tc, tokenizer, entries, (train_entries, test_entries, val_entries),
        trainable=trainable, lora=lora, data_name=data_name, source=source)
    samples_path = run_dir / "samples.txt"

    def samples(params, step: int, record: dict[str, Any]) -> dict[str, Any]:
        return answer_samples(params, config, tokenizer, val_entries[:dc.sample_count], step,
                              record, style=dc.style, max_new_tokens=dc.sample_tokens,
                              path=samples_path,
                              heading=f"val loss {record['val_loss']:.3f}, reward margin "
                                      f"{record['val_reward_margin']:.3f}")

    def describe(r: dict[str, Any]) -> str:
        return (f"step {r['step']}: train loss {r['train_loss']:.3f}, val loss "
                f"{r['val_loss']:.3f}, val reward margin {r['val_reward_margin']:.3f}, "
                f"accuracy {r['val_reward_accuracy']:.2f}")

    def finish(records: list[dict[str, Any]]) -> None:
        plot_dpo(records, run_dir / "loss.png",
                 title=f"{data_name}: DPO, beta {dc.beta}, {dc.logprob} log-probabilities")

    with open_run(run_dir, config, tc, identity=identity, kind=META_KIND,
                  task=dpo_task(dc.beta, dc.logprob), params=params, trainable=trainable,
                  mesh=mesh, partition_rules=partition_rules, resume=resume,
                  fallback=fallback, keep=dc.keep) as run:
        fresh = run.resumed_from is None
        ref_start = time.perf_counter()
        reference = _reference(run_dir, run.state, config, dc, splits, tc.batch_size,
                               collate_kw, fresh=fresh)
        reference_s = time.perf_counter() - ref_start
        if fresh:
            samples_path.write_text("")
        batches = PreferenceBatches(splits["train"], tc.batch_size, seed=tc.seed,
                                    collate_kwargs=collate_kw, reference=reference["train"])
        evals = {s: fixed_pair_batches(splits[s], tc.batch_size, dc.eval_batches,
                                       reference=reference[s], **collate_kw)
                 for s in ("train", "validation")}
        done = run.fit(batches, meta=meta, evaluations={
            "train": Means(evals["train"]), "val": Means(evals["validation"]),
            "samples": samples}, log_every=dc.log_every, eval_every=dc.eval_every,
            save_every=dc.save_every, unit="pairs", stop_at=stop_at, describe=describe,
            finish=finish, progress=progress)
        memory = peak_memory_bytes()
        # -- the test split: the metrics, then an answer to every prompt ------------
        params = done.state.params
        (test,) = run.means(params, fixed_pair_batches(splits["test"], tc.batch_size,
                                                       reference=reference["test"],
                                                       **collate_kw))
    test.pop("count")
    gen_stats = None
    if dc.responses:
        answers, gen_stats = generate_responses(
            params, config, tokenizer, test_entries, style=dc.style,
            max_new_tokens=dc.response_tokens, batch_size=dc.response_batch)
        out = [dict(e, model_response=a) for e, a in zip(test_entries, answers)]
        (run_dir / "responses.json").write_text(json.dumps(out, indent=2) + "\n")

    first, last, steps = done.first_eval, done.last_eval, int(done.state.step)
    summary = {
        "run_dir": str(run_dir), "source": source, "beta": dc.beta, "logprob": dc.logprob,
        "style": dc.style, "book_collate": dc.book_collate, "steps": steps,
        "resumed_from": run.resumed_from, "epochs": steps / batches.batches_per_epoch,
        "train_pairs": len(train_entries), "val_pairs": len(val_entries),
        "test_pairs": len(test_entries),
        "trainable_params": count_trainable(params, trainable),
        "total_params": sum(int(x.size) for x in jax.tree.leaves(params)),
        "reference_s": reference_s if fresh else None,
        "train_wall_s": done.wall_s, "compile_s": done.timing.compile_s,
        "steps_per_s": done.steps_per_s, **memory,
        "initial": {k: first.get("val_" + k) for k in METRICS} if first else None,
        "final_train": {k: last.get("train_" + k) for k in METRICS} if last else None,
        "final_val": {k: last.get("val_" + k) for k in METRICS} if last else None,
        "test": test, "responses": gen_stats, "last_checkpoint": done.last_saved,
        "wall_s": time.perf_counter() - wall_start,
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _reference(run_dir: Path, state, config, dc, splits, batch_size, collate_kw, fresh: bool):
    """{split: {"ref_chosen", "ref_rejected"}}: computed from the starting state and
    saved, or read back on resume."""
    path = run_dir / REFERENCE_FILE
    if not fresh:
        if not path.is_file():
            raise ValueError(f"{path} is missing: the reference log-probabilities of the run's "
                             f"starting model cannot be recomputed from a resumed state; start "
                             f"the run afresh")
        with np.load(path) as saved:
            out = {s: {k: saved[f"{s}/{k}"] for k in ("ref_chosen", "ref_rejected")}
                   for s in splits}
        for s, pairs in splits.items():
            if len(out[s]["ref_chosen"]) != len(pairs):
                raise ValueError(f"{path} holds {len(out[s]['ref_chosen'])} {s} pairs, the data "
                                 f"{len(pairs)}: resume with the run's own data")
        return out
    out = {s: reference_logprobs(state.params, config, pairs, batch_size, reduction=dc.logprob,
                                 collate_kwargs=collate_kw) for s, pairs in splits.items()}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **{f"{s}/{k}": v for s, ref in out.items() for k, v in ref.items()})
    tmp.replace(path)
    return out


def plot_dpo(records: list[dict[str, Any]], path, *, title: str | None = None) -> None:
    """A panel per metric against steps: each step's training batch and the
    evaluations on the training and validation batches (at `plot.DPI`, as
    every run's curves)."""
    from jaxllm.train.plot import DPI, plt

    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    panels = (("loss", "loss"), ("rewards", None), ("reward_margin", "reward margin"),
              ("reward_accuracy", "reward accuracy"))
    fig, axes = plt.subplots(2, 2, figsize=(9.6, 6.4))
    for ax, (key, label) in zip(axes.flat, panels):
        keys = ("chosen_reward", "rejected_reward") if key == "rewards" else (key,)
        for k, color in zip(keys, ("tab:blue", "tab:red")):
            name = k.replace("_", " ")
            if train:
                ax.plot([r["step"] for r in train], [r[k] for r in train], color=color,
                        alpha=0.5, linewidth=1.0, label=f"{name}, training batch each step")
            if evals:
                x = [r["step"] for r in evals]
                ax.plot(x, [r["train_" + k] for r in evals], "o-", color=color, markersize=3,
                        label=f"{name}, training data (evaluated)")
                ax.plot(x, [r["val_" + k] for r in evals], "s--", color=color, markersize=3,
                        label=f"{name}, validation data (evaluated)")
        ax.set_xlabel("step")
        ax.set_ylabel(label or "reward")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def format_summary(s: dict[str, Any]) -> str:
    rate = f"{s['steps_per_s']:.2f} steps/s" if s["steps_per_s"] else "n/a"
    lines = [f"DPO {s['steps']} steps ({s['epochs']:.2f} epochs, beta {s['beta']}, "
             f"{s['logprob']} log-probabilities) in {s['train_wall_s']:.1f} s, {rate}"]
    if s["final_val"]:
        v, i = s["final_val"], s["initial"]
        lines.append(f"validation: loss {v['loss']:.3f} (from {i['loss']:.3f}), reward margin "
                     f"{v['reward_margin']:.3f} (from {i['reward_margin']:.3f}), accuracy "
                     f"{v['reward_accuracy']:.2f}")
    t = s["test"]
    lines.append(f"test: loss {t['loss']:.3f}, reward margin {t['reward_margin']:.3f}, "
                 f"accuracy {t['reward_accuracy']:.2f}")
    lines.append(f"wrote {s['run_dir']}/: metrics.jsonl, loss.png, samples.txt, "
                 + ("responses.json, " if s["responses"] else "")
                 + f"{REFERENCE_FILE}, summary.json, checkpoints/{s['last_checkpoint']}")
    return "\n".join(lines)


__all__ = ["DPOConfig", "finetune_dpo", "format_summary", "plot_dpo", "REDUCTIONS"]
