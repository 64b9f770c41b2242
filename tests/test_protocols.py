"""Weight decay as torch does it (`TrainConfig.weight_decay_on`, `TrainConfig.torch_adamw`)
and `--protocol book` of each fine-tuning command: the book's setting in every
hyperparameter, as the commands resolve them (nothing trains here)."""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxllm.train import TrainConfig, make_optimizer

# The book's chapters 6 and 7 and appendix E, as its code has them.
BOOK_ADAMW = dict(beta1=0.9, beta2=0.999, eps=1e-8, warmup_steps=0, min_lr_ratio=1.0,
                  grad_clip=None, weight_decay_on="all")
CHAPTER_6 = dict(BOOK_ADAMW, lr=5e-5, weight_decay=0.1, batch_size=8, seed=123)
APPENDIX_E = dict(CHAPTER_6, lr=8e-4)
CHAPTER_7 = dict(BOOK_ADAMW, lr=5e-5, weight_decay=0.1, batch_size=8, seed=123)


def tree(seed=0):
    rng = np.random.default_rng(seed)
    return {"dense": {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
                      "bias": rng.normal(size=(3,)).astype(np.float32)},
            "norm": {"scale": 1 + rng.normal(size=(3,)).astype(np.float32)},
            "tok_emb": {"embedding": rng.normal(size=(5, 4)).astype(np.float32)}}


@pytest.mark.parametrize("decay_on", ["all", "matrices"])
def test_adamw_steps_equal_torch_adamw(decay_on):
    """`torch_adamw` is torch.optim.AdamW(params, lr, weight_decay) stepped
    plainly: every parameter decays ("all"), or only the weight matrices."""
    tc = TrainConfig.torch_adamw(0.05, weight_decay=0.3, weight_decay_on=decay_on)
    assert (tc.beta1, tc.beta2, tc.eps, tc.warmup_steps, tc.min_lr_ratio, tc.grad_clip) == \
        (0.9, 0.999, 1e-8, 0, 1.0, None)
    params = jax.tree.map(jnp.asarray, tree())
    opt = make_optimizer(tc)
    state = opt.init(params)
    theirs = {k: {n: torch.tensor(np.asarray(v), requires_grad=True) for n, v in d.items()}
              for k, d in tree().items()}
    flat = [(k, n, t) for k, d in theirs.items() for n, t in d.items()]
    if decay_on == "all":
        groups = [{"params": [t for _, _, t in flat]}]
    else:  # the dense kernel alone: no biases, LayerNorm or embeddings
        groups = [{"params": [theirs["dense"]["kernel"]]},
                  {"params": [t for k, n, t in flat if n != "kernel"], "weight_decay": 0.0}]
    t_opt = torch.optim.AdamW(groups, lr=0.05, weight_decay=0.3)
    rng = np.random.default_rng(1)
    for _ in range(4):
        grads = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), tree())
        updates, state = opt.update(jax.tree.map(jnp.asarray, grads), state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        for k, n, t in flat:
            t.grad = torch.tensor(grads[k][n])
        t_opt.step()
    for k, n, t in flat:
        np.testing.assert_allclose(np.asarray(params[k][n]), t.detach().numpy(), rtol=0,
                                   atol=1e-5, err_msg=f"{k}/{n}")


def test_weight_decay_on_is_checked():
    with pytest.raises(ValueError, match=r"weight_decay_on must be one of \('matrices', 'all'\)"):
        TrainConfig(weight_decay_on="biases")


def write_data(tmp_path):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(dict(vocab_size=257, context_length=32, emb_dim=32, n_heads=4,
                                   n_layers=2, drop_rate=0.0)))
    spam = tmp_path / "spam.tsv"
    spam.write_text("\n".join([f"spam\tWIN prize {i}" for i in range(30)]
                              + [f"ham\tlunch on day {i}?" for i in range(30)]) + "\n")
    instr = tmp_path / "instr.json"
    instr.write_text(json.dumps([{"instruction": f"Add {i} and 1.", "input": "",
                                  "output": f"{i + 1}"} for i in range(40)]))
    return ["--init", "random", "--config", str(cfg), "--tokenizer", "byte"], spam, instr


def parse(module, argv):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


def train_fields(tc, keys):
    return {k: getattr(tc, k) for k in keys}


def test_classify_book_protocol_is_chapter_6_and_appendix_e(tmp_path):
    from jaxllm.cli import finetune_classify as cli

    start, spam, _ = write_data(tmp_path)
    args = parse(cli, [*start, "--data", str(spam), "--protocol", "book",
                       "--out", str(tmp_path / "a")])
    config, tc, cc, data, _, params, _, record = cli.build(args)
    assert train_fields(tc, CHAPTER_6) == CHAPTER_6
    assert (cc.pooling, cc.trainable, cc.eval_every, cc.eval_batches) == \
        ("last_position", "last_block", 50, 5)
    assert tc.total_steps == 5 * (len(data.train) // 8) and record is None  # 5 epochs
    assert data.info["seed"] == 123 and data.max_length == int(data.train.lengths.max())

    args = parse(cli, [*start, "--data", str(spam), "--protocol", "book", "--lora-rank", "16",
                       "--lora-alpha", "16", "--out", str(tmp_path / "b")])
    config, tc, cc, data, _, params, _, record = cli.build(args)
    assert train_fields(tc, APPENDIX_E) == APPENDIX_E
    assert (record["scale"], record["init"], record["targets"]) == ("book", "book", "all")
    from jaxllm import lora
    from jaxllm.finetune.classify import HEAD

    adapters, scales = lora.adapters_of(params)
    assert len(adapters) == 4 * config.n_layers + 1 and HEAD in adapters
    assert set(scales.values()) == {16.0} and cc.trainable == lora.TRAINABLE

    # the default protocol: jaxllm's two choices, the rest the book's
    args = parse(cli, [*start, "--data", str(spam), "--out", str(tmp_path / "c")])
    _, tc, cc, *_ = cli.build(args)
    assert train_fields(tc, CHAPTER_6) == dict(CHAPTER_6, weight_decay_on="matrices")
    assert cc.pooling == "last_token"


def test_instruct_book_protocol_is_chapter_7(tmp_path):
    from jaxllm.cli import finetune_instruct as cli
    from jaxllm.data.instructions import split_instructions

    start, _, instr = write_data(tmp_path)
    args = parse(cli, [*start, "--data", str(instr), "--protocol", "book",
                       "--out", str(tmp_path / "a")])
    _, tc, ic, _, entries, *_ = cli.build(args)
    assert train_fields(tc, CHAPTER_7) == CHAPTER_7
    assert tc.total_steps == 2 * (len(split_instructions(entries)[0]) // 8)  # 2 epochs
    assert (ic.style, ic.mask_prompt, ic.allowed_max_length, ic.eval_every, ic.eval_batches) == \
        ("alpaca", False, 1024, 5, 5)
    args = parse(cli, [*start, "--data", str(instr), "--out", str(tmp_path / "b")])
    _, tc, *_ = cli.build(args)
    assert tc.weight_decay_on == "matrices"
    assert train_fields(tc, CHAPTER_7) == dict(CHAPTER_7, weight_decay_on="matrices", seed=0)


def test_a_checkpoint_from_before_weight_decay_on_resumes_as_matrices():
    """Runs saved before the field existed decayed the matrices: they resume so."""
    import dataclasses

    from jaxllm.train.checkpoint import config_differences

    now = dataclasses.asdict(TrainConfig())
    saved = {k: v for k, v in now.items() if k != "weight_decay_on"}
    assert config_differences({"train": saved}, {"train": now}) == []
    assert config_differences({"train": saved}, {"train": dict(now, weight_decay_on="all")}) == \
        ["train.weight_decay_on: checkpoint 'matrices', now 'all'"]


def test_a_classifier_saved_with_decay_all_resumes_with_the_decay_it_had():
    """`classify.decay_all` (older runs) is read as `train.weight_decay_on`, and
    `keep_best` may change on resume: it decides what is kept, not what trains."""
    import dataclasses

    from jaxllm.train.checkpoint import config_differences
    from jaxllm.train.runner import CADENCE_FIELDS

    now = dataclasses.asdict(TrainConfig())
    old_train = {k: v for k, v in now.items() if k != "weight_decay_on"}
    for decay_all, decay_on in ((True, "all"), (False, "matrices")):
        saved = {"train": old_train, "classify": {"pooling": "last_token", "decay_all": decay_all}}
        current = {"train": dict(now, weight_decay_on=decay_on),
                   "classify": {"pooling": "last_token"}}
        assert config_differences(saved, current) == []
        other = "matrices" if decay_on == "all" else "all"
        assert config_differences(saved, dict(current, train=dict(now, weight_decay_on=other))) \
            == [f"train.weight_decay_on: checkpoint {decay_on!r}, now {other!r}"]
    assert "keep_best" in CADENCE_FIELDS
