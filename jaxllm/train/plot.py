"""The loss curve: training and validation loss against tokens seen."""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter  # noqa: E402


def plot_losses(records: list[dict[str, Any]], path: str | os.PathLike, *,
                tokens_per_epoch: int | None = None, title: str | None = None) -> None:
    """Per-step training loss (faint), eval train/val loss (lines with markers)
    against tokens seen; an upper axis in epochs when `tokens_per_epoch` is given."""
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=100)
    if train:
        ax.plot([r["tokens"] for r in train], [r["loss"] for r in train], color="tab:blue",
                alpha=0.3, linewidth=0.8, label="training loss (per step)")
    if evals:
        x = [r["tokens"] for r in evals]
        ax.plot(x, [r["train_loss"] for r in evals], "o-", color="tab:blue", markersize=3,
                label="training loss (eval)")
        ax.plot(x, [r["val_loss"] for r in evals], "s-", color="tab:orange", markersize=3,
                label="validation loss")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss (cross-entropy, nats)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    if tokens_per_epoch:
        top = ax.secondary_xaxis("top", functions=(lambda t: t / tokens_per_epoch,
                                                   lambda e: e * tokens_per_epoch))
        top.set_xlabel("epochs")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 200k, 1M
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
