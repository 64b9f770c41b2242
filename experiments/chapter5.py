"""The classic chapter-5 pretraining run on the-verdict.txt, replayed with jaxllm.

Setting (as published): GPT_CONFIG_124M with context_length 256 (dropout 0.1,
no qkv bias), GPT-2 tokenizer, the token stream split 90/10, windows of 256
tokens with stride 256, batch size 2, shuffled training batches, AdamW at a
constant lr 4e-4 with weight decay 0.1 (torch defaults betas (0.9, 0.999),
eps 1e-8; no warmup, no decay schedule, no clipping), 10 epochs, evaluation
every 5 steps on 5 training batches and the validation batch. The published
model is built from `nn.Embedding` and `nn.Linear`, so it starts from PyTorch's
default initialisation (embeddings N(0, 1), uniform weights): `--init torch`
(the default here) starts from the same distribution, `--init gpt2` from GPT-2's
N(0, 0.02), which learns this tiny corpus far more slowly.

Published figures: untrained losses about 10.99 (train) / 10.98 (val); after
the first update 9.781 / 9.933; at the last evaluation (step 85 of 90)
0.391 / 6.452. Results go to results/chapter5/ (results.json, results.md,
loss.png); the run folder (metrics, samples, checkpoint) to runs/chapter5/.

    python -m experiments.chapter5 [--data PATH] [--epochs 10] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from experiments.common import markdown_table, results_dir, write_report
from jaxllm.config import GPT_CONFIG_124M, count_params
from jaxllm.data import (SlidingWindows, WindowBatches, read_documents, split_tokens,
                         tokenize_documents)
from jaxllm.tokenizer import GPT2Tokenizer
from jaxllm.train.pretrain import LoopConfig, train
from jaxllm.train.metrics import MetricsLog
from jaxllm.train.optim import TrainConfig, lr_schedule
from jaxllm.train.plot import plot_losses

PUBLISHED = {"untrained": (10.99, 10.98), "after_first_step": (9.781, 9.933),
             "last_eval": (0.391, 6.452), "last_eval_step": 85}
CONTEXT, BATCH, SEED = 256, 2, 123


def default_data() -> Path:
    """`shared/data/the-verdict.txt` in the nearest folder above the checkout."""
    repo = Path(__file__).resolve().parents[1]
    for parent in [repo, *repo.parents]:
        candidate = parent / "shared" / "data" / "the-verdict.txt"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"the-verdict.txt not found in shared/data/ above {repo}; "
                            f"pass --data PATH")


def write_results(out: Path, data_name: str, wall: float | None) -> None:
    """results/chapter5/: the published figures beside this run's, and the plot."""
    records = MetricsLog(out).read()
    evals = [r for r in records if r["kind"] == "eval"]
    steps = max((r["step"] for r in records if r["kind"] == "train"), default=0)
    rows = [
        ["untrained (step 0)", *PUBLISHED["untrained"], evals[0]["train_loss"],
         evals[0]["val_loss"]],
        [f"last evaluation (published: step {PUBLISHED['last_eval_step']}; jaxllm: step "
         f"{evals[-1]['step']})", *PUBLISHED["last_eval"], evals[-1]["train_loss"],
         evals[-1]["val_loss"]],
    ]
    timing = f", {wall / 60:.1f} min wall on this machine" if wall else ""
    sample = next((r["sample_greedy"] for r in reversed(evals) if "sample_greedy" in r), "")
    markdown = (f"# Chapter-5 pretraining on {data_name}\n\n"
                f"GPT-2 124M (context {CONTEXT}), batch {BATCH}, AdamW lr 4e-4, weight decay 0.1, "
                f"dropout 0.1; {steps} steps done{timing}. The published run evaluates after "
                f"1, 6, 11, ... updates, this one after 0, 5, 10, ...\n\n"
                + markdown_table(["point", "published train", "published val", "jaxllm train",
                                  "jaxllm val"], rows)
                + f"\nGreedy sample at step {evals[-1]['step']}:\n\n```\n{sample}\n```\n")
    res = results_dir("chapter5")
    config = json.loads((out / "config.json").read_text())
    plot_losses(records, res / "loss.png",
                tokens_per_epoch=config["batches_per_epoch"] * config["tokens_per_step"],
                title=f"chapter 5: GPT-2 124M on {data_name}")
    write_report("chapter5", {"published": PUBLISHED, "steps": steps, "wall_s": wall,
                              "evals": [{k: r[k] for k in ("step", "tokens", "train_loss",
                                                           "val_loss")} for r in evals]},
                 markdown)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", help="the-verdict.txt (default: ../shared/data/the-verdict.txt)")
    parser.add_argument("--tokenizer-dir", help="GPT-2 vocabulary folder (default: the data's folder)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--init", choices=("torch", "gpt2"), default="torch",
                        help="parameter initialisation: 'torch' (nn.Embedding/nn.Linear defaults, "
                             "as the published model starts) or GPT-2's N(0, 0.02)")
    parser.add_argument("--steps", type=int, help="stop after this many steps (a quick check)")
    parser.add_argument("--out", default="runs/chapter5")
    parser.add_argument("--report-only", action="store_true",
                        help="write results/chapter5 from the metrics already in --out")
    args = parser.parse_args(argv)

    data = Path(args.data) if args.data else default_data()
    if not data.is_file():
        raise FileNotFoundError(f"data file {data} does not exist")
    tok_dir = args.tokenizer_dir or (data.parent if (data.parent / "gpt2.tiktoken").exists()
                                     else None)
    tokenizer = GPT2Tokenizer(tok_dir)
    tokens = tokenize_documents(read_documents(data), tokenizer)
    train_tokens, _ = split_tokens(tokens, 0.9)
    per_epoch = len(WindowBatches(SlidingWindows(train_tokens, CONTEXT, CONTEXT), BATCH))
    total = args.epochs * per_epoch

    config = GPT_CONFIG_124M.replace(context_length=CONTEXT)
    tc = TrainConfig(lr=4e-4, min_lr_ratio=1.0, warmup_steps=0, total_steps=total,
                     weight_decay=0.1, decay_embeddings=True, beta1=0.9, beta2=0.999, eps=1e-8,
                     grad_clip=None, batch_size=BATCH, seed=SEED, init=args.init)
    schedule = lr_schedule(tc)
    assert float(schedule(0)) == float(schedule(total)) == float(np.float32(4e-4))  # constant
    lc = LoopConfig(max_length=CONTEXT, stride=CONTEXT, train_ratio=0.9, eval_every=5,
                    eval_batches=5, log_every=1, save_every=10**9, keep=1,
                    sample_prompt="Every effort moves you", sample_tokens=50,
                    sample_every=per_epoch * 5, temperature=0.0)
    print(f"{data}: {len(tokens)} tokens, {per_epoch} batches of {BATCH}x{CONTEXT} per epoch, "
          f"{total} steps; model {count_params(config):,} parameters", file=sys.stderr)
    out = Path(args.out)
    if args.report_only:
        write_results(out, data.name, None)
        return 0
    if out.exists():
        shutil.rmtree(out)
    start = time.perf_counter()
    train(out, config, tc, lc, tokenizer, tokens, data_name=data.name, stop_at=args.steps)
    wall = time.perf_counter() - start

    write_results(out, data.name, wall)
    return 0


if __name__ == "__main__":
    sys.exit(main())
