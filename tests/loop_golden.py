"""Fixed-seed runs of every training command, for `tests/test_one_loop.py`.

`python -m tests.loop_golden` records each run's per-step training metrics
and its evaluations into tests/data/loop_golden.json; the test reruns the
same functions and compares. The file was written by the four commands'
loops as they were before they became one (commit 88dd5b2), so the test
proves the one loop writes the losses they wrote.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from jaxllm import lora
from jaxllm.config import GPTConfig
from jaxllm.data import default_corpus_documents, tokenize_documents
from jaxllm.data.classification import prepare_classification
from jaxllm.finetune.dpo_run import DPOConfig, finetune_dpo
from jaxllm.finetune.instruct_run import InstructConfig, finetune_instruct
from jaxllm.finetune.classify_run import ClassifyConfig, finetune_classify
from jaxllm.model import init_params
from jaxllm.tokenizer import ByteTokenizer
from jaxllm.train import TrainConfig
from jaxllm.train.pretrain import LoopConfig, train

GOLDEN = Path(__file__).parent / "data" / "loop_golden.json"
TOK = ByteTokenizer()
# Dropout on: the runs must also reproduce the dropout masks of each step.
CONFIG = GPTConfig(vocab_size=257, context_length=32, emb_dim=32, n_heads=2, n_layers=2,
                   drop_rate=0.1)
# Fine-tuning: room for the chat prompt and its answer in byte tokens.
FT_CONFIG = CONFIG.replace(context_length=96)
WORDS = ("alpha", "beta", "gamma", "delta", "kappa", "omega", "sigma", "theta")


def _words(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS, n))


def _metrics(run_dir: Path) -> list[dict]:
    """Each metrics.jsonl row's numbers (samples left out: text, not losses)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if isinstance(v, (int, float)) or k == "kind"}
            for r in rows]


def pretrain(run_dir: Path, **kw) -> list[dict]:
    tokens = tokenize_documents(default_corpus_documents()[:2], TOK)[:4000]
    lc = LoopConfig(eval_every=3, eval_batches=2, log_every=2, save_every=4, keep=2,
                    sample_prompt="The ", sample_tokens=4, temperature=0.0)
    tc = TrainConfig(total_steps=6, batch_size=4, lr=1e-2, warmup_steps=2, grad_accum=2)
    train(run_dir, CONFIG, tc, lc, TOK, tokens, data_name="golden", progress=False, **kw)
    return _metrics(run_dir)


def classify(run_dir: Path, **kw) -> list[dict]:
    rng = np.random.default_rng(0)
    path = run_dir.parent / (run_dir.name + ".csv")
    path.write_text("label,text\n" + "".join(
        f"{c},{_words(rng, int(rng.integers(2, 7)))} {c}\n"
        for c in ("spam", "ham", "news") * 16))
    data = prepare_classification(path, TOK, context_length=64, label_column="label",
                                  text_column="text")
    tc = TrainConfig.torch_adamw(lr=3e-3, weight_decay=0.1, batch_size=4, total_steps=6)
    cc = ClassifyConfig(eval_every=3, eval_batches=2, log_every=2, save_every=4)
    finetune_classify(run_dir, FT_CONFIG, tc, cc, data, tokenizer_name="byte", progress=False,
                      **kw)
    return _metrics(run_dir)


def _entries(n: int, preferences: bool = False) -> list[dict]:
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        e = {"instruction": f"Say {_words(rng, 2)}", "input": _words(rng, i % 3),
             "output": _words(rng, 3)}
        if preferences:
            e["chosen"], e["rejected"] = e["output"], _words(rng, 1 + i % 4)
        out.append(e)
    return out


def instruct(run_dir: Path, **kw) -> list[dict]:
    """With LoRA adapters: the trainable subset's path too."""
    tc = TrainConfig.torch_adamw(lr=3e-3, weight_decay=0.1, batch_size=4, total_steps=6,
                                 weight_decay_on="matrices")
    ic = InstructConfig(style="chat", mask_prompt=True, eval_every=3, eval_batches=2, log_every=2,
                        save_every=4, sample_count=0, responses=False, pad_multiple=32)
    import jax


    base = init_params(FT_CONFIG, jax.random.key(3))
    params = lora.with_adapters(base, lora.init_lora(base, FT_CONFIG, jax.random.key(4), rank=2),
                                alpha=4)
    finetune_instruct(run_dir, FT_CONFIG, tc, ic, TOK, _entries(40), params=params,
                      trainable=lora.TRAINABLE, progress=False, **kw)
    return _metrics(run_dir)


def dpo(run_dir: Path, **kw) -> list[dict]:
    tc = TrainConfig.torch_adamw(lr=3e-3, weight_decay=0.01, batch_size=4, total_steps=6)
    dc = DPOConfig(style="chat", eval_every=3, eval_batches=2, log_every=2, save_every=4, sample_count=0,
                   responses=False, pad_multiple=32)
    finetune_dpo(run_dir, FT_CONFIG, tc, dc, TOK, _entries(40, preferences=True),
                 progress=False, **kw)
    return _metrics(run_dir)


# Each run's function takes the run folder and any further keyword of its command's
# function (mesh=..., stop_at=..., resume=...).
RUNS = {"pretrain": pretrain, "classify": classify, "instruct": instruct, "dpo": dpo}


def main() -> int:
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in RUNS.items():
            out[name] = fn(Path(tmp) / name)
    GOLDEN.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {GOLDEN}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
