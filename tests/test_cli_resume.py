"""Resuming through `jaxllm pretrain`: a longer run, the run's own tokenizer, said even with --quiet."""

import json

import pytest

from jaxllm.cli import main
from jaxllm.data import corpus

TINY = ["pretrain", "--preset", "small", "--set", "context_length=16", "--set", "n_layers=1",
        "--set", "emb_dim=32", "--set", "n_heads=2", "--set", "batch_size=4",
        "--set", "eval_batches=1", "--set", "sample_tokens=2", "--eval-every", "4",
        "--save-every", "4", "--quiet"]


@pytest.fixture
def finished(tmp_path):
    run = tmp_path / "run"
    assert main(TINY + ["--steps", "4", "--out", str(run)]) == 0
    return run


def test_a_finished_run_is_extended_with_more_steps(finished, capsys):
    assert main(TINY + ["--steps", "8", "--out", str(finished), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"resuming {finished} from step 4 (total steps 4 -> 8)" in err
    record = json.loads((finished / "config.json").read_text())
    assert record["train"]["total_steps"] == 8
    assert record["schedule_changes"] == [{"at_step": 4, "total_steps": 8, "was": 4}]
    steps = [json.loads(l)["step"] for l in (finished / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "train"]
    assert steps == list(range(1, 9))


def test_resume_uses_the_runs_tokenizer_and_refuses_another(finished, capsys):
    assert main(TINY + ["--steps", "4", "--out", str(finished), "--resume",
                        "--tokenizer", "gpt2"]) == 2
    assert "was trained with the byte tokenizer, not --tokenizer gpt2" in capsys.readouterr().err
    assert main(TINY + ["--steps", "4", "--out", str(finished), "--resume"]) == 0
    assert f"resuming {finished} from step 4" in capsys.readouterr().err


def test_the_utf8_hint_names_the_cli_flag(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff no")
    with pytest.raises(ValueError, match="use --errors replace"):
        corpus.read_text_file(bad)


def test_an_empty_data_file_leaves_no_run_folder(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(TINY + ["--data", str(empty), "--steps", "2", "--out", str(tmp_path / "r")]) == 2
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
