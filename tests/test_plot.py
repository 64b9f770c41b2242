"""The run's curves: saved at 150 dpi, each step's batch loss and the
evaluations (from step 0) drawn, in plain legend labels."""

import numpy as np
from PIL import Image

from jaxllm.train import plot


def records(n_steps=40, eval_every=10):
    rows = [{"kind": "train", "step": s, "tokens": 64 * s, "loss": 5.0 / s, "accuracy": 0.5}
            for s in range(1, n_steps + 1)]
    rows += [{"kind": "eval", "step": s, "tokens": 64 * s, "train_loss": 5.0 / (s + 1),
              "val_loss": 5.5 / (s + 1), "train_accuracy": 0.6, "val_accuracy": 0.55}
             for s in range(0, n_steps + 1, eval_every)]
    return rows


def test_curves_are_sharp_and_plainly_labelled(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(plot.plt, "close", drawn.append)  # keep the figure to read it
    plot.plot_losses(records(), tmp_path / "loss.png", tokens_per_epoch=640, eval_batches=5)
    with Image.open(tmp_path / "loss.png") as png:
        assert png.size == (960, 570)  # 6.4 x 3.8 inches at 150 dpi
        assert np.round(png.info["dpi"]).tolist() == [150, 150]
    (ax, *_), = [f.axes for f in drawn]
    handles, labels = ax.get_legend_handles_labels()
    assert labels == ["training batch, each step", "training data (evaluated, 5 batches)",
                      "validation data (evaluated, 5 batches)"]
    per_step, at_evals, _ = handles
    assert per_step.get_alpha() >= 0.4 and per_step.get_linewidth() >= 1.0  # visible
    assert at_evals.get_xdata()[0] == 0  # the evaluations start at step 0

    plot.plot_metric(records(), tmp_path / "accuracy.png", key="accuracy",
                     ylabel="accuracy")
    _, labels = drawn[-1].axes[0].get_legend_handles_labels()
    assert labels == ["training batch, each step", "training data (evaluated)",
                      "validation data (evaluated)"]
    assert plot.common_batch_count([1, 2], [3, 4]) == 2
    assert plot.common_batch_count([1, 2], [3]) is None
