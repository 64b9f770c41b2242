"""`jaxllm pretrain`: option parsing, config routing, vocabulary matching, a tiny real run."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxllm.cli import pretrain
from jaxllm.tokenizer import ByteTokenizer, GPT2Tokenizer

REPO = Path(__file__).resolve().parents[1]


def parse(*argv):
    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_set_overrides_are_typed_and_routed():
    model, tc, lc, explicit = pretrain.build_configs(parse(
        "--set", "emb_dim=64", "--set", "n_heads=2", "--set", "qkv_bias=true",
        "--set", "lr=1e-3", "--set", "grad_clip=none", "--set", "max_length=32",
        "--set", "sample_prompt=Once upon", "--steps", "7", "--keep", "1"))
    assert model.emb_dim == 64 and model.n_heads == 2 and model.qkv_bias is True
    assert model.n_layers == 4  # from the small preset
    assert tc.lr == 1e-3 and tc.grad_clip is None and tc.total_steps == 7
    assert lc.max_length == 32 and lc.sample_prompt == "Once upon" and lc.keep == 1
    assert {"emb_dim", "lr", "total_steps", "keep"} <= explicit and "vocab_size" not in explicit


@pytest.mark.parametrize("item, message", [
    ("colour=blue", "--set colour: unknown setting"),
    ("emb_dim", "expects KEY=VALUE"),
    ("emb_dim=big", r"--set emb_dim=big: expected int"),
    ("qkv_bias=maybe", "expected bool"),
    ("lr=fast", "expected float"),
])
def test_bad_overrides(item, message):
    with pytest.raises(ValueError, match=message):
        pretrain.build_configs(parse("--set", item))


def test_config_file_flat_and_sectioned(tmp_path):
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"vocab_size": 300, "context_length": 32, "emb_dim": 48,
                                "n_heads": 3, "n_layers": 1, "lr": 5e-4, "eval_every": 7}))
    model, tc, lc, explicit = pretrain.build_configs(parse("--config", str(flat)))
    assert (model.emb_dim, model.n_heads, tc.lr, lc.eval_every) == (48, 3, 5e-4, 7)
    assert "vocab_size" in explicit
    sectioned = tmp_path / "run.json"
    sectioned.write_text(json.dumps({"model": {"emb_dim": 64, "n_heads": 4}, "train": {"seed": 3},
                                     "loop": {"keep": 5}, "tokenizer": "byte"}))
    model, tc, lc, _ = pretrain.build_configs(parse("--config", str(sectioned), "--set", "seed=4"))
    assert model.emb_dim == 64 and tc.seed == 4 and lc.keep == 5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"emb_dimension": 64}))
    with pytest.raises(ValueError, match="unknown field 'emb_dimension'"):
        pretrain.build_configs(parse("--config", str(bad)))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        pretrain.build_configs(parse("--config", str(tmp_path / "missing.json")))


def test_vocab_follows_tokenizer_unless_set(shared_data):
    model, _, _, explicit = pretrain.build_configs(parse("--preset", "small"))
    assert pretrain.match_vocab(model, GPT2Tokenizer(shared_data), explicit).vocab_size == 50257
    model, _, _, explicit = pretrain.build_configs(parse("--set", "vocab_size=500"))
    with pytest.raises(ValueError, match="vocab_size=500 was set explicitly.*byte tokenizer has 257"):
        pretrain.match_vocab(model, ByteTokenizer(), explicit)


def test_errors_become_messages_and_exit_codes(tmp_path, capsys):
    assert pretrain.run(parse("--set", "colour=blue", "--out", str(tmp_path))) == 2
    assert "unknown setting" in capsys.readouterr().err
    assert pretrain.run(parse("--data", str(tmp_path / "none.txt"), "--out", str(tmp_path))) == 2
    assert "none.txt does not exist" in capsys.readouterr().err


def test_tiny_end_to_end_run(tmp_path, capsys):
    """`python -m jaxllm pretrain` from a text file, then resumed with more evals."""
    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat. " * 120)
    out = tmp_path / "run"
    common = [sys.executable, "-m", "jaxllm", "pretrain", "--data", str(text), "--out", str(out),
              "--token-file", str(tmp_path / "corpus.bin"), "--quiet",
              "--set", "context_length=16", "--set", "emb_dim=16", "--set", "n_heads=2",
              "--set", "n_layers=1", "--set", "batch_size=4", "--set", "lr=1e-2",
              "--set", "sample_tokens=4", "--set", "eval_batches=2", "--steps", "8",
              "--eval-every", "4", "--save-every", "4"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(common, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "trained 8 steps" in done.stdout
    for name in ("metrics.jsonl", "loss.png", "samples.txt", "summary.json", "config.json"):
        assert (out / name).is_file(), name
    header = json.loads((tmp_path / "corpus.bin.json").read_text())
    assert header["tokenizer"] == "byte" and header["count"] == len(text.read_text())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    assert pretrain.run(parse(*common[4:])) == 2  # a second run may not overwrite the first
    assert "already holds checkpoints" in capsys.readouterr().err

    # The trained run generates from its last checkpoint, with its own (byte) tokenizer.
    from jaxllm.cli import main

    assert main(["generate", "--run-dir", str(out), "--prompt", "the cat",
                 "--max-new-tokens", "6", "--ignore-eos", "--no-stream"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("the cat") and len(printed.rstrip("\n")) > len("the cat")


@pytest.mark.parametrize("flags, expected", [
    ((), False),
    (("--reuse-host-memory",), True),
    (("--cpu-recipe",), True),  # the recipe's speed assumes it
    (("--cpu-recipe", "--no-reuse-host-memory"), False),
])
def test_host_memory_reuse_only_when_asked(flags, expected, monkeypatch, tmp_path, capsys):
    import jaxllm.host_memory as host_memory

    calls = []
    monkeypatch.setattr(host_memory, "reuse_host_memory", lambda *a, **k: calls.append(a))
    args = parse(*flags, "--set", "colour=blue", "--out", str(tmp_path))
    assert pretrain.wants_host_memory_reuse(args) is expected
    # applied first thing in `run`, before the (here failing) configuration is read
    assert pretrain.run(args) == 2
    assert "unknown setting" in capsys.readouterr().err
    assert len(calls) == int(expected)
