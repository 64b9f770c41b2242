"""`finetune classify --keep-best`: the parameters of the evaluation with the
best validation accuracy are kept in `<run>/best`, named in summary.json, and
are the very parameters the run had at that step."""

from __future__ import annotations

import json

import jax
import numpy as np

from jaxllm.cli import main
from jaxllm.config import GPTConfig
from jaxllm.data.classification import prepare_classification
from jaxllm.finetune.classify_run import ClassifyConfig, classify_texts, finetune_classify
from jaxllm.tokenizer import ByteTokenizer
from jaxllm.train import TrainConfig, checkpoint

CONFIG = GPTConfig(vocab_size=257, context_length=16, emb_dim=32, n_heads=4, n_layers=2,
                   drop_rate=0.0)
TC = TrainConfig(lr=3e-3, warmup_steps=0, min_lr_ratio=1.0, batch_size=4, total_steps=8)


def labelled(path):
    """Two classes a tiny model can start to tell apart, and some noise."""
    rng = np.random.default_rng(0)
    lines = [f"{'spam' if i % 2 else 'ham'}\t{'WIN $$$ now' if i % 2 else 'see you'} "
             f"{rng.integers(1000)}\n" for i in range(60)]
    path.write_text("".join(lines))
    return path


def test_the_best_evaluation_is_kept_and_named(tmp_path):
    data = prepare_classification(labelled(tmp_path / "d.tsv"), ByteTokenizer(),
                                  context_length=CONFIG.context_length)
    cc = ClassifyConfig(eval_every=1, eval_batches=2, keep_best=True, trainable="all")
    kw = dict(tokenizer_name="byte", progress=False)
    summary = finetune_classify(tmp_path / "a", CONFIG, TC, cc, data, **kw)
    evals = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").open()
             if '"eval"' in line]
    best = max(evals, key=lambda r: r["val_accuracy"])  # the first of equals
    assert summary["best"]["step"] == best["step"] and [r["step"] for r in evals] == list(range(9))
    assert summary["best"]["eval_val_accuracy"] == best["val_accuracy"]
    assert summary["best"]["run_dir"] == str(tmp_path / "a" / "best")
    assert set(summary["best"]["accuracy"]) == {"train", "validation", "test"}

    # the kept parameters are those a run stopped at that step ends with (this
    # seeded run's best is neither the first nor the last evaluation)
    assert 0 < best["step"] < TC.total_steps
    stopped = finetune_classify(tmp_path / "b", CONFIG, TC, cc, data, stop_at=best["step"], **kw)
    kept, _, _ = checkpoint.load_params(tmp_path / "a" / "best")
    at_step, _, _ = checkpoint.load_params(tmp_path / "b")
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(kept),
                                                    jax.tree.leaves(at_step)))
    assert summary["best"]["accuracy"] == stopped["accuracy"]
    assert stopped["best"]["step"] == best["step"]
    # best/ is a classifier run folder of its own
    labels = classify_texts(tmp_path / "a" / "best", ["WIN $$$ now 5", "see you 7"])
    assert [r["label"] in ("ham", "spam") for r in labels] == [True, True]


def test_cli_keep_best(tmp_path, capsys):
    data = labelled(tmp_path / "d.tsv")
    argv = ["finetune", "classify", "--init", "random", "--tokenizer", "byte", "--data",
            str(data), "--set", "context_length=16", "--set", "emb_dim=32", "--set",
            "n_layers=1", "--set", "batch_size=4", "--steps", "3", "--eval-every", "1",
            "--eval-batches", "1", "--quiet", "--out", str(tmp_path / "run")]
    assert main(argv + ["--keep-best"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert f"best validation accuracy at step {summary['best']['step']}" in out
    assert checkpoint.open_manager(tmp_path / "run" / "best").all_steps() == [
        summary["best"]["step"]]
