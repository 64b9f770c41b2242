"""Preference data and DPO: the collate, the loss and its gradient, AdamW steps
against an independent PyTorch DPO, the cached reference, bad input."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxllm import lora
from jaxllm.data.preferences import (Pair, PreferenceBatches, collate, read_preferences,
                                     split_preferences, tokenize_pairs)
from jaxllm.finetune.dpo import (dpo_loss, dpo_losses, dpo_task, reference_logprobs,
                                 sequence_logprobs)
from jaxllm.finetune.instruct import format_prompt
from jaxllm.parity import assert_passed, dpo as parity_dpo
from jaxllm.parity.dpo import tiny_pairs
from jaxllm.parity.finetune import INSTRUCT_CONFIG as TINY
from jaxllm.parity.reference import random_params
from jaxllm.tokenizer import get_tokenizer
from jaxllm.train import TrainConfig
from jaxllm.train.task import path_str


# -- the book's collate, transcribed from its notebook (chapter 7 bonus: DPO) -----
def book_collate(batch, pad_token_id=50256, allowed_max_length=None, mask_prompt_tokens=True):
    batch_data = {"prompt": [], "chosen": [], "rejected": [], "rejected_mask": [],
                  "chosen_mask": []}
    max_length_common = 0
    if batch:
        for key in ["chosen", "rejected"]:
            current_max = max(len(item[key]) + 1 for item in batch)
            max_length_common = max(max_length_common, current_max)
    for item in batch:
        prompt = torch.tensor(item["prompt"])
        batch_data["prompt"].append(prompt)
        for key in ["chosen", "rejected"]:
            sequence = item[key]
            padded = sequence + [pad_token_id] * (max_length_common - len(sequence))
            mask = torch.ones(len(padded)).bool()
            mask[len(sequence):] = False
            if mask_prompt_tokens:
                mask[:prompt.shape[0] + 2] = False
            batch_data[key].append(torch.tensor(padded))
            batch_data[f"{key}_mask"].append(mask)
    for key in ["chosen", "rejected", "chosen_mask", "rejected_mask"]:
        tensor_stack = torch.stack(batch_data[key])
        if allowed_max_length is not None:
            tensor_stack = tensor_stack[:, :allowed_max_length]
        batch_data[key] = tensor_stack
    return batch_data


def book_format_input(entry):  # the book's, for the prompt its collate masks
    instruction_text = (
        f"Below is an instruction that describes a task. "
        f"Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{entry['instruction']}")
    input_text = f"\n\n### Input:\n{entry['input']}" if entry["input"] else ""
    return instruction_text + input_text


def book_encode(entry, tokenizer):  # the book's PreferenceDataset item
    prompt = book_format_input(entry)
    return {"prompt": tokenizer.encode(prompt),
            "chosen": tokenizer.encode(f"{prompt}\n\n### Response:\n{entry['chosen']}"),
            "rejected": tokenizer.encode(f"{prompt}\n\n### Response:\n{entry['rejected']}")}


HAND = [Pair(np.array([1, 2, 3, 4, 5], np.int32), np.array([1, 2, 3, 9], np.int32), 2),
        Pair(np.array([6, 7, 8], np.int32), np.array([6, 7, 8, 8, 8, 8, 8], np.int32), 1)]


def test_collate_on_hand_made_pairs():
    b = collate(HAND, pad_id=0)
    # one common width for both halves: the longest (7) plus one
    assert b["chosen"].tolist() == [[1, 2, 3, 4, 5, 0, 0, 0], [6, 7, 8, 0, 0, 0, 0, 0]]
    assert b["rejected"].tolist() == [[1, 2, 3, 9, 0, 0, 0, 0], [6, 7, 8, 8, 8, 8, 8, 0]]
    # 0 on the unscored prefix and on padding
    assert b["chosen_mask"].astype(int).tolist() == [[0, 0, 1, 1, 1, 0, 0, 0],
                                                     [0, 1, 1, 0, 0, 0, 0, 0]]
    assert b["rejected_mask"].astype(int).tolist() == [[0, 0, 1, 1, 0, 0, 0, 0],
                                                       [0, 1, 1, 1, 1, 1, 1, 0]]
    cut = collate(HAND, pad_id=0, allowed_max_length=4)
    assert all(cut[k].tolist() == [r[:4] for r in b[k].tolist()] for k in b)
    wide = collate(HAND, pad_id=0, pad_multiple=5)
    assert wide["chosen"].shape == (2, 10) and not wide["chosen_mask"][:, 8:].any()
    with pytest.raises(ValueError, match="at least one pair"):
        collate([])


def test_book_collate_is_the_notebooks_exactly(shared_data):
    tokenizer = get_tokenizer("gpt2", shared_data)
    entries = read_preferences(shared_data / "instruction-data-with-preference.json")
    # the book's prompt masks its own tokens and the 2 after them: "\n", "\n"
    pairs = tokenize_pairs(entries[:24], tokenizer, book=True)
    assert pairs[0].prefix == len(tokenizer.encode(book_format_input(entries[0]))) + 2
    assert tokenizer.decode(pairs[0].chosen[pairs[0].prefix - 2:pairs[0].prefix].tolist()) \
        == "\n\n"
    for start, allowed in ((0, None), (8, 60), (16, 1024)):
        ours = collate(pairs[start:start + 8], allowed_max_length=allowed)
        theirs = book_collate([book_encode(e, tokenizer) for e in entries[start:start + 8]],
                              allowed_max_length=allowed)
        for key in ("chosen", "rejected", "chosen_mask", "rejected_mask"):
            np.testing.assert_array_equal(ours[key], theirs[key].numpy(), err_msg=key)
    # the default form scores exactly the answer and one end-of-text
    p = tokenize_pairs(entries[:1], tokenizer)[0]
    prompt = tokenizer.encode(format_prompt(entries[0]))
    assert p.prefix == len(prompt)
    assert p.chosen.tolist() == prompt + tokenizer.encode(entries[0]["chosen"]) + [50256]
    with pytest.raises(ValueError, match="Alpaca"):
        tokenize_pairs(entries[:1], tokenizer, "chat", book=True)


def test_shared_file_split_and_identical_pairs(shared_data):
    entries = read_preferences(shared_data / "instruction-data-with-preference.json")
    train, test, val = split_preferences(entries)
    assert (len(entries), len(train), len(test), len(val)) == (1100, 935, 110, 55)
    assert test[0] is entries[935] and val[0] is entries[1045]
    assert sum(e["chosen"] == e["rejected"] for e in entries) == 6
    assert set(entries[0]) == {"instruction", "input", "output", "chosen", "rejected"}


def test_reading_errors_name_what_is_wrong(tmp_path):
    def write(name, content):
        p = tmp_path / name
        p.write_text(content)
        return p

    good = {"instruction": "Say hi.", "chosen": "Hi.", "rejected": "No."}
    assert read_preferences(write("ok.jsonl", json.dumps(good) + "\n"))[0] == \
        dict(good, input="")
    cases = [
        ("missing.json", json.dumps([good, {"instruction": "x", "chosen": "y"}]),
         r"missing\.json entry 1 has no 'rejected' key"),
        ("number.json", json.dumps([dict(good, chosen=3)]), r"entry 0: 'chosen' must be a string"),
        ("output.json", json.dumps([dict(good, output=None)]), r"'output' must be a string"),
        ("input.json", json.dumps([dict(good, input=["a"])]), r"'input' must be a string"),
        ("empty.json", "[]", r"empty\.json holds an empty list"),
        ("broken.jsonl", json.dumps(good) + "\n" + json.dumps(good) + "\n{\"instruction\": \n",
         r"broken\.jsonl line 3 is not JSON"),
        ("blank.jsonl", "\n\n", r"preference data .*blank\.jsonl is empty"),
    ]
    for name, content, message in cases:
        with pytest.raises(ValueError, match=message):
            read_preferences(write(name, content))
    with pytest.raises(FileNotFoundError, match="preference data .* does not exist"):
        read_preferences(tmp_path / "nothing.json")


# -- the loss against the formula in torch ---------------------------------------
@pytest.mark.parametrize("beta,scale", [(0.1, False), (0.5, True)])
def test_dpo_loss_and_gradient_equal_torch(beta, scale):
    # the parity check (`jaxllm parity`): loss and rewards within 1e-6 of torch's
    # formula, the gradient too, every row's gradient above 1e-4
    values_close, grads_close = assert_passed(parity_dpo.loss_formula(beta, scale))
    assert values_close.tolerance == grads_close.tolerance == 1e-6 and grads_close.rtol == 0
    rng = np.random.default_rng(0)
    values = [(-3 * rng.random(16)).astype(np.float32) for _ in range(4)]
    # policy == reference: every pair's loss is ln 2 and the rewards 0, exactly (the
    # batch mean of 16 float32 ln 2 is within float32 summation rounding of it)
    same = jnp.asarray(values[0]), jnp.asarray(values[1])
    losses, chosen, rejected = dpo_losses(*same, *same, beta, scale_rewards=scale)
    assert np.all(np.asarray(losses) == np.float32(math.log(2)))
    assert not np.asarray(chosen).any() and not np.asarray(rejected).any()
    loss = dpo_loss(*same, *same, beta, scale_rewards=scale)[0]
    assert abs(float(loss) - math.log(2)) < 1e-6


# -- tiny pairs, the task and AdamW against an independent torch DPO -------------
COLLATE = parity_dpo.COLLATE


@pytest.mark.parametrize("reduction,beta", [("mean", 0.1), ("sum", 0.5)])
def test_adamw_dpo_steps_equal_torch(reduction, beta):
    # the parity check: loss and rewards at each of 5 steps within 1e-5 of an
    # independent torch DPO's, the first loss ln 2 (policy = reference), every
    # weight after within 1e-5, and the steps must learn
    steps, first, weights = assert_passed(parity_dpo.adamw_steps(reduction, beta))
    assert steps.tolerance == weights.tolerance == 1e-5 and first.tolerance == 1e-6
    assert steps.rtol == first.rtol == weights.rtol == 0


def test_a_pair_with_chosen_equal_to_rejected_has_no_gradient():
    params = random_params(TINY, seed=21)
    pairs = tiny_pairs(3, seed=22)
    same = Pair(pairs[0].chosen, pairs[0].chosen, pairs[0].prefix)
    ref = reference_logprobs(params, TINY, [pairs[1], pairs[2], same], 3, collate_kwargs=COLLATE)
    ref = {k: v + 0.3 for k, v in ref.items()}  # the policy has moved off the start
    task = dpo_task(0.1, "mean")
    grad = jax.jit(jax.grad(lambda p, batch: task(p, batch, TINY)[0]))

    def grads(rows):
        batch = collate([[pairs[1], pairs[2], same][i] for i in rows], **COLLATE)
        return jax.tree.leaves(grad(params, dict(batch, **{k: v[rows] for k, v in ref.items()})))

    # its margin is 0 exactly, so its term's gradient is beta * sigma(0) * (d log pi(chosen)
    # - d log pi(rejected)) = 0: beside other pairs (the loss is their sum) it adds nothing
    # to theirs but float32 rounding in the backward sums
    without = grads([0, 1])
    others = max(float(jnp.abs(g).max()) for g in without)
    assert others > 1e-3
    for a, b in zip(grads([0, 1, 2]), without):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * others)


@pytest.mark.parametrize("adapters", [False, True])
def test_cached_reference_equals_the_reference_on_the_fly(adapters):
    base = random_params(TINY, seed=31)
    pairs = tiny_pairs(12, seed=32)
    params = base
    if adapters:  # the reference is the base: the adapters are switched off
        params = lora.lora_params(base, TINY, jax.random.key(0), rank=2, alpha=4.0)
        params = jax.tree_util.tree_map_with_path(  # B no longer zero: the adapters matter
            lambda path, x: x + 0.05 if path_str(path).endswith("lora/b") else x, params)
    for reduction in ("mean", "sum"):
        cache = reference_logprobs(params, TINY, pairs, 4, reduction=reduction,
                                   collate_kwargs=COLLATE)
        batches = PreferenceBatches(pairs, 4, seed=33, collate_kwargs=COLLATE, reference=cache)
        on_the_fly = jax.jit(sequence_logprobs, static_argnums=3, static_argnames="reduction")
        for k in range(4):  # shuffled batches, into a second epoch
            batch = batches.batch_at(k)
            for key in ("chosen", "rejected"):
                # the same values from other batches: equal up to float32 summation order
                np.testing.assert_allclose(
                    batch[f"ref_{key}"], on_the_fly(base, batch[key], batch[f"{key}_mask"], TINY,
                                                    reduction=reduction), rtol=1e-6, atol=1e-6)
        if adapters:
            policy = on_the_fly(params, batch["chosen"], batch["chosen_mask"], TINY)
            assert np.abs(np.asarray(policy) - batch["ref_chosen"]).max() > 1e-3


# -- the command line and the loop, end to end -------------------------------------
def run_dpo(argv) -> int:
    from jaxllm.cli import finetune_dpo
    from jaxllm.cli.finetune import task_parser

    return finetune_dpo.run(task_parser("dpo").parse_args(argv))


def test_cli_dpo_trains_resumes_plots_and_answers(shared_data, tmp_path, capsys):
    from jaxllm.finetune.dpo_run import DPOConfig, finetune_dpo
    from jaxllm.config import GPTConfig

    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(dict(vocab_size=257, context_length=128, emb_dim=32, n_heads=4,
                                      n_layers=2, drop_rate=0.0, attn_impl="reference")))
    data = shared_data / "instruction-data-with-preference.json"
    out = tmp_path / "run"
    argv = ["--init", "random", "--config", str(config), "--data", str(data), "--limit", "40",
            "--steps", "4", "--eval-every", "2", "--max-new-tokens", "4", "--logprob", "sum",
            "--style", "chat",
            "--set", "lr=3e-3", "--set", "batch_size=4", "--set", "sample_count=0",
            "--set", "pad_multiple=128", "--set", "response_batch=2",
            "--set", "eval_batches=1", "--out", str(out), "--quiet"]
    assert run_dpo(argv) == 0
    captured = capsys.readouterr()
    assert "DPO 4 steps" in captured.out and "responses.json" in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["train_pairs"], summary["test_pairs"]) == (4, 34, 4)
    assert summary["logprob"] == "sum" and summary["initial"]["loss"] == pytest.approx(math.log(2))
    # it learns the training pairs (4 steps of a random model need not generalise)
    assert summary["final_train"]["reward_margin"] > 0 and summary["initial"]["reward_margin"] == 0
    assert summary["final_train"]["loss"] < math.log(2) - 0.01
    assert summary["steps_per_s"] > 0 and summary["host_peak_rss_bytes"] > 0
    responses = json.loads((out / "responses.json").read_text())
    entries = read_preferences(data)
    assert [r["chosen"] for r in responses] == [e["chosen"] for e in entries[34:38]]
    assert all(isinstance(r["model_response"], str) and "rejected" in r for r in responses)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2, 4]
    train = [r for r in records if r["kind"] == "train"]
    for r in train:  # the margin is the rewards' difference; accuracy a share
        assert r["reward_margin"] == pytest.approx(r["chosen_reward"] - r["rejected_reward"],
                                                   abs=1e-5)
        assert 0 <= r["reward_accuracy"] <= 1
    assert (out / "loss.png").stat().st_size > 0 and (out / "reference.npz").is_file()
    assert json.loads((out / "config.json").read_text())["dpo"]["logprob"] == "sum"
    from jaxllm.finetune.instruct_run import prompt_style_of

    assert prompt_style_of(out) == "chat"  # what a DPO run from this one reads
    from jaxllm.cli.chat import prompt_style
    from jaxllm.train.checkpoint import read_meta

    assert prompt_style(read_meta(out), get_tokenizer("byte")) == "chat"  # and chat

    assert run_dpo(argv) == 2  # a second start on the same folder is refused
    assert "already holds checkpoints" in capsys.readouterr().err

    # interrupted at step 2 and resumed: the losses of the uninterrupted run
    from jaxllm.cli.finetune_dpo import TRAIN_PROTOCOLS

    tok = get_tokenizer("byte")
    dc = DPOConfig(logprob="sum", style="chat", eval_every=2, sample_count=0, responses=False,
                   pad_multiple=128, eval_batches=1)
    tc = TrainConfig.torch_adamw(**{**TRAIN_PROTOCOLS["default"], "lr": 3e-3, "batch_size": 4,
                                    "total_steps": 4})
    part = tmp_path / "part"
    tiny = GPTConfig.from_json(config)
    finetune_dpo(part, tiny, tc, dc, tok, entries[:40], progress=False, stop_at=2)
    finetune_dpo(part, tiny, tc, dc, tok, entries[:40], progress=False, resume=True)
    losses = [[(r["loss"], r["chosen_reward"]) for r in
               map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "train"] for d in (out, part)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    (part / "reference.npz").unlink()
    with pytest.raises(ValueError, match="reference.npz is missing"):
        finetune_dpo(part, tiny, tc.replace(total_steps=6), dc, tok, entries[:40],
                     progress=False, resume=True)

    # LoRA: only adapters train, the reference is the base, and the book's protocol runs
    lora_out = tmp_path / "lora"
    assert run_dpo(["--init", "random", "--config", str(config), "--data", str(data),
                    "--limit", "40", "--steps", "1", "--protocol", "book", "--no-responses",
                    "--lora-rank", "2", "--set", "batch_size=4", "--set", "sample_count=0",
                    "--set", "pad_multiple=128", "--set", "eval_batches=1", "--out",
                    str(lora_out), "--quiet"]) == 0
    summary = json.loads((lora_out / "summary.json").read_text())
    assert summary["book_collate"] and summary["trainable_params"] < summary["total_params"] / 5
    assert summary["initial"]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    saved = json.loads((lora_out / "config.json").read_text())
    assert saved["train"]["weight_decay_on"] == "all" and saved["lora"]["rank"] == 2


def test_dpo_runs_on_the_llama_family():
    """The log-probabilities are those of the family's own logits, and DPO steps start at
    ln 2 and learn, with grouped-query attention, RoPE and SwiGLU."""
    from jaxllm.config import GPTConfig
    from jaxllm.model import forward, init_params
    from jaxllm.train import init_train_state, make_train_step

    config = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2,
                       ffn_dim=48, norm="rmsnorm", positions="rope", mlp="swiglu",
                       qkv_bias=False, out_bias=False, mlp_bias=False, drop_rate=0.0,
                       n_kv_heads=2)
    params = init_params(config, jax.random.key(3))
    pairs = tiny_pairs(8, seed=41)
    cache = reference_logprobs(params, config, pairs, 4, reduction="sum", collate_kwargs=COLLATE)
    batches = PreferenceBatches(pairs, 4, seed=42, collate_kwargs=COLLATE, reference=cache)
    batch = batches.batch_at(0)
    logp = jax.nn.log_softmax(forward(params, batch["chosen"], config)[:, :-1])
    picked = np.take_along_axis(np.asarray(logp), batch["chosen"][:, 1:, None], -1)[..., 0]
    mask = batch["chosen_mask"][:, 1:]
    np.testing.assert_allclose(batch["ref_chosen"], (picked * mask).sum(1), rtol=1e-5,
                               atol=1e-5)
    tc = TrainConfig(lr=3e-3, warmup_steps=0, min_lr_ratio=1.0, grad_clip=None, batch_size=4,
                     total_steps=3)
    step = make_train_step(config, tc, task=dpo_task(0.1, "sum"))
    state = init_train_state(params, tc)
    losses = []
    for k in range(3):
        state, m = step(state, batches.batch_at(k % 2))
        losses.append(float(m["loss"]))
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[2] < losses[0] - 1e-3
