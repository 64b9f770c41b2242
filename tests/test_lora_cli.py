"""LoRA through the command line: `jaxllm pretrain` runs resumed with or without
the LoRA flags, the tied head merged into an untied Hugging Face model."""

from __future__ import annotations

import re

import jax
import numpy as np

from jaxllm import apply, from_hf_state_dict, lora
from jaxllm.cli import main
from jaxllm.config import get_preset
from jaxllm.model import init_params
from jaxllm.train import TrainConfig, checkpoint, init_train_state

TINY = ["--preset", "small", "--set", "context_length=16", "--set", "n_layers=1",
        "--set", "emb_dim=32", "--set", "n_heads=2", "--set", "batch_size=2",
        "--set", "eval_batches=1", "--set", "sample_tokens=2", "--eval-every", "100", "--quiet"]
CONFIG = get_preset("small").replace(context_length=16, n_layers=1, emb_dim=32, n_heads=2)


def leaves(params):
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(params)}


def test_pretrain_lora_run_resumes_as_saved_and_refuses_other_flags(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["pretrain", *TINY, "--steps", "2", "--out", run, "--lora-rank", "4",
                 "--lora-alpha", "8", "--lora-targets", "attn,head"]) == 0
    first, config, _ = checkpoint.load_params(run)
    assert config.tie_embeddings and sorted(lora.adapters_of(first)[0]) == \
        ["blocks/0/attn/out", "blocks/0/attn/qkv", "out_head"]  # the tied head adapted

    # no LoRA flags: the run goes on with its own adapters, and says so
    assert main(["pretrain", *TINY, "--steps", "4", "--out", run, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "resuming the run's LoRA adapters (targets attn,head, rank 4, alpha 8, qkv split)" in err
    second = checkpoint.load_params(run)[0]
    adapters, scales = lora.adapters_of(second)
    assert set(scales.values()) == {2.0}  # alpha 8 / rank 4, as saved
    base = leaves(init_params(config, jax.random.key(TrainConfig().seed)))
    for name, x in leaves(lora.strip_adapters(second)).items():  # frozen: bitwise the init
        np.testing.assert_array_equal(x, base[name], err_msg=name)
    moved = [p for p, ab in lora.adapters_of(first)[0].items()
             if not np.array_equal(np.asarray(ab["b"]), np.asarray(adapters[p]["b"]))]
    assert sorted(moved) == sorted(adapters)

    # the same flags are fine; different ones are refused, naming the flag and the saved value
    for flags, message in [
        (["--lora-alpha", "2"], "--lora-alpha 2: .* was trained with --lora-alpha 8"),
        (["--lora-rank", "2"], "--lora-rank 2: .* was trained with --lora-rank 4"),
        (["--lora-targets", "all"], "--lora-targets all: .* was trained with --lora-targets "
                                    "attn,head"),
        (["--lora-qkv", "fused"], "--lora-qkv fused: .* was trained with --lora-qkv split"),
    ]:
        assert main(["pretrain", *TINY, "--steps", "6", "--out", run, "--resume", *flags]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), (flags, err)
    assert checkpoint.load_params(run)[0]["blocks"][0]["attn"]["qkv"]["lora"]["b"].shape == \
        (3, 4, 32)

    # the merged tied head: an untied Hugging Face model with the adapter in lm_head.weight
    hf = tmp_path / "hf"
    assert main(["lora", "merge", "--run-dir", run, "--out", str(hf)]) == 0
    assert '"tie_word_embeddings": false' in (hf / "config.json").read_text()
    untied = config.replace(tie_embeddings=False)
    merged = from_hf_state_dict(hf / "model.safetensors", untied)
    x = np.array([[1, 2, 3, 4, 5]], np.int32)
    np.testing.assert_allclose(np.asarray(apply(merged, x, untied)),
                               np.asarray(apply(second, x, config)), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(merged["tok_emb"]["embedding"])[:257],
                                  base["['tok_emb']['embedding']"][:257])


def test_lora_flags_on_resuming_a_run_without_adapters_are_refused(tmp_path, capsys):
    run = tmp_path / "plain"
    tc = TrainConfig()
    checkpoint.save(checkpoint.open_manager(run, create=True),
                    init_train_state(init_params(CONFIG, jax.random.key(0)), tc),
                    {"model": CONFIG.to_dict(), "tokenizer": "byte"})
    assert main(["pretrain", *TINY, "--steps", "2", "--out", str(run), "--resume",
                 "--lora-rank", "4"]) == 2
    assert f"--lora-rank: {run} was trained without adapters" in capsys.readouterr().err
    assert main(["pretrain", *TINY, "--out", str(tmp_path / "new"), "--lora-targets", "attn"]) == 2
    assert "--lora-targets needs --lora-rank" in capsys.readouterr().err
