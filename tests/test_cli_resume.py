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


def test_a_total_below_the_resumed_step_is_refused(finished, capsys):
    before = (finished / "config.json").read_text()
    assert main(TINY + ["--steps", "2", "--out", str(finished), "--resume"]) == 2
    assert "is at step 4: a total of 2 steps ends before it" in capsys.readouterr().err
    assert (finished / "config.json").read_text() == before


def classify_argv(tmp_path, n_layers=2):
    """`jaxllm finetune classify` of a tiny random model on 60 labelled rows."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(dict(vocab_size=257, context_length=32, emb_dim=32, n_heads=4,
                                      n_layers=n_layers, drop_rate=0.0)))
    data = tmp_path / "spam.tsv"
    data.write_text("".join(f"spam\tWIN cash {i} now\n" if i % 2 else f"ham\tlunch at {i}?\n"
                            for i in range(60)))
    return ["finetune", "classify", "--init", "random", "--config", str(config),
            "--tokenizer", "byte", "--data", str(data), "--eval-every", "2",
            "--eval-batches", "1", "--set", "batch_size=4", "--quiet"]


def test_a_finished_fine_tuning_run_is_extended_as_if_it_had_run_on(tmp_path, capsys):
    argv = [*classify_argv(tmp_path), "--set", "lr=1e-3"]
    assert main([*argv, "--steps", "6", "--out", str(tmp_path / "straight")]) == 0
    assert main([*argv, "--steps", "4", "--out", str(tmp_path / "short")]) == 0
    capsys.readouterr()
    assert main([*argv, "--steps", "6", "--out", str(tmp_path / "short"), "--resume"]) == 0
    assert "from step 4 (total steps 4 -> 6)" in capsys.readouterr().err
    record = json.loads((tmp_path / "short" / "config.json").read_text())
    assert record["schedule_changes"] == [{"at_step": 4, "total_steps": 6, "was": 4}]

    def losses(run):  # a constant learning rate: the extension is the straight run
        rows = map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
        return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]

    assert losses("short") == losses("straight") and len(losses("short")) == 6


def test_fine_tuning_a_run_takes_its_tokenizer_and_refuses_another(finished, tmp_path, capsys):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": str(i)}
                                for i in range(24)]))
    for task in ("instruct", "classify"):
        assert main(["finetune", task, "--run-dir", str(finished), "--tokenizer", "gpt2",
                     "--data", str(data), "--out", str(tmp_path / task)]) == 2
        assert "was trained with the byte tokenizer, not --tokenizer gpt2; drop the flag to " \
               "fine-tune it with the run's own" in capsys.readouterr().err
        assert not (tmp_path / task).exists()


def test_a_classifier_resumed_with_another_data_seed_is_refused(tmp_path, capsys):
    argv = [*classify_argv(tmp_path, n_layers=1), "--out", str(tmp_path / "r")]
    assert main([*argv, "--steps", "2"]) == 0
    assert main([*argv, "--steps", "4", "--resume", "--data-seed", "7"]) == 2
    assert "data.seed: checkpoint 123, now 7" in capsys.readouterr().err
    other = tmp_path / "other.tsv"  # another --data file of as many rows: refused too
    other.write_text("".join(f"spam\tFREE prize {i}\n" if i % 2 else f"ham\tdinner {i}\n"
                             for i in range(60)))
    data = argv.index("--data") + 1
    assert main([*argv[:data], str(other), *argv[data + 1:], "--steps", "4", "--resume"]) == 2
    assert "data.sha256: checkpoint" in capsys.readouterr().err
    # another save cadence is no other run: accepted (the finished run has nothing left to do)
    assert main([*argv, "--steps", "2", "--resume", "--save-every", "1"]) == 0
