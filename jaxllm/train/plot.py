"""The curves of a run: a metric per step and at each evaluation, against how
much data was seen (tokens or examples), with epochs on the top axis.

`plot_metric` draws one figure for any metric that `metrics.jsonl` holds as
`"loss"` in the per-step records and as `"train_loss"` / `"val_loss"` in the
evaluation records (accuracy likewise); `plot_losses` is the pretraining and
instruction runs' loss curve. Figures are saved at `DPI` dots per inch, sharp
when zoomed.
"""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402

DPI = 150


def plot_metric(records: list[dict[str, Any]], path: str | os.PathLike, *, key: str = "loss",
                x: str = "tokens", xlabel: str = "tokens seen",
                ylabel: str = "loss (cross-entropy)", per_epoch: int | None = None,
                eval_batches: int | None = None, title: str | None = None) -> None:
    """`key` at every training step (the loss of that step's batch) and at each
    evaluation (training and validation data: the mean over `eval_batches`
    fixed batches of each, when given), against `x`; an upper axis in epochs
    when `per_epoch` (units of `x` per epoch) is given."""
    train = [r for r in records if r.get("kind") == "train" and key in r]
    evals = [r for r in records if r.get("kind") == "eval" and f"val_{key}" in r]
    of = f", {eval_batches} batches" if eval_batches else ""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    if train:
        ax.plot([r[x] for r in train], [r[key] for r in train], color="tab:blue", alpha=0.5,
                linewidth=1.0, label="training batch, each step")
    if evals:
        at = [r[x] for r in evals]
        # markers where it was measured; the thin dashes between them are no measurement
        ax.plot(at, [r[f"train_{key}"] for r in evals], "o--", color="navy", markersize=4,
                linewidth=0.9, label=f"training data (evaluated{of})")
        ax.plot(at, [r[f"val_{key}"] for r in evals], "s--", color="tab:orange", markersize=4,
                linewidth=0.9, label=f"validation data (evaluated{of})")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    if per_epoch:
        top = ax.secondary_xaxis("top", functions=(lambda t: t / per_epoch,
                                                   lambda e: e * per_epoch))
        top.set_xlabel("epochs")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 200k, 1M
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def common_batch_count(train_eval: list, val_eval: list) -> int | None:
    """The batches an evaluation reads from each split, for the legend; None
    when the two splits gave different counts."""
    return len(train_eval) if len(train_eval) == len(val_eval) else None


def plot_losses(records: list[dict[str, Any]], path: str | os.PathLike, *,
                tokens_per_epoch: int | None = None, title: str | None = None,
                eval_batches: int | None = None) -> None:
    """The loss against tokens seen: each step's batch, and the evaluations."""
    plot_metric(records, path, per_epoch=tokens_per_epoch, title=title,
                eval_batches=eval_batches)
