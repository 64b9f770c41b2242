"""Run folders and flags that used to lose results or end in a traceback: each case a
command a user ran (issue 31 B.2, B.3, B.6), answered with one sentence."""

import json
import os

import jax
import pytest

from jaxllm.cli import main
from jaxllm.config import GPTConfig
from jaxllm.model import init_params
from jaxllm.train import TrainConfig, checkpoint, init_train_state
from jaxllm.train.runner import check_resumable, check_run_folder

TINY = GPTConfig(vocab_size=257, context_length=16, emb_dim=16, n_heads=2, n_layers=1,
                 drop_rate=0.0)
PRETRAIN = ["pretrain", "--preset", "small", "--set", "context_length=16", "--set",
            "n_layers=1", "--set", "emb_dim=32", "--set", "n_heads=2", "--set", "batch_size=4",
            "--steps", "2", "--quiet"]


def fake_run(run_dir, **meta):
    """A checkpoint as a training command writes one, without training."""
    params = init_params(TINY, jax.random.key(0))
    manager = checkpoint.open_manager(run_dir, create=True)
    checkpoint.save(manager, init_train_state(params, TrainConfig()),
                    {"model": TINY.to_dict(), "tokenizer": "byte", **meta})
    manager.close()
    return run_dir


def one_error(capsys, command: str) -> str:
    """The one line a refused command printed: no traceback."""
    err = capsys.readouterr().err
    assert err.startswith(f"jaxllm {command}: error: ") and err.count("\n") == 1, err
    return err


def classify_argv(tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(dict(vocab_size=257, context_length=32, emb_dim=16, n_heads=2,
                                      n_layers=1, drop_rate=0.0)))
    data = tmp_path / "spam.tsv"
    data.write_text("".join(f"spam\tWIN cash {i} now\n" if i % 2 else f"ham\tlunch at {i}?\n"
                            for i in range(40)))
    return ["finetune", "classify", "--init", "random", "--config", str(config),
            "--tokenizer", "byte", "--data", str(data), "--set", "batch_size=4", "--quiet"]


def test_an_out_that_is_a_file_or_under_one_is_a_sentence(tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    for command, argv in (("pretrain", PRETRAIN), ("finetune classify", classify_argv(tmp_path))):
        assert main([*argv, "--out", str(file)]) == 2
        assert f"--out {file} is a file, not a folder" in one_error(capsys, command)
        assert main([*argv, "--out", str(file / "run")]) == 2
        assert f"{file} is a file, so no folder can be made under it" in one_error(capsys,
                                                                                   command)
    assert file.read_text() == "mine"


def test_an_unwritable_out_is_a_sentence(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere: there is nothing to refuse
            pytest.skip("running as root: a read-only folder is writable")
        assert main([*PRETRAIN, "--out", str(locked / "run")]) == 2
        assert f"--out {locked / 'run'} cannot be written: no write permission on {locked}" \
            in one_error(capsys, "pretrain")
    finally:
        locked.chmod(0o755)


def test_the_folder_check_refuses_a_file_under_a_file_and_no_permission(tmp_path, monkeypatch):
    """The same checks at the library level; the permission case by `os.access`, which
    is what the check asks (so it runs as root too)."""
    file = tmp_path / "f"
    file.write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_run_folder(file, resume=False)
    with pytest.raises(ValueError, match="is a file, so no folder can be made under it"):
        check_run_folder(file / "a" / "b", resume=True)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ValueError, match=r"--out .*new cannot be written: no write permission"):
        check_run_folder(tmp_path / "new", resume=False)


def test_another_runs_results_without_checkpoints_are_not_overwritten(tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 2.0}\n')
    (other / "summary.json").write_text('{"steps": 1}\n')
    for resume in ([], ["--resume"]):
        assert main([*PRETRAIN, "--out", str(other), *resume]) == 2
        assert "holds the metrics.jsonl and summary.json of a run but no checkpoint" in \
            one_error(capsys, "pretrain")
        assert main([*classify_argv(tmp_path), "--out", str(other), *resume]) == 2
        one_error(capsys, "finetune classify")
    assert (other / "summary.json").read_text() == '{"steps": 1}\n'


def test_resume_on_an_empty_folder_says_it_starts_afresh(tmp_path, capsys):
    from jaxllm.config import GPTConfig
    from jaxllm.train.loop import open_run

    run = tmp_path / "new"
    config = GPTConfig(vocab_size=257, context_length=8, emb_dim=8, n_heads=2, n_layers=1)
    with open_run(run, config, TrainConfig(total_steps=2), identity={}, resume=True) as r:
        assert r.resumed_from is None and r.saved == {} and int(r.state.step) == 0
    assert f"--resume: {run} holds no checkpoint; starting a new run there at step 0" in \
        capsys.readouterr().err


def test_resuming_the_run_a_fine_tuning_starts_from_names_its_kind(tmp_path, capsys):
    pre = fake_run(tmp_path / "pre", data_position=0)
    argv = [a for a in classify_argv(tmp_path) if a not in ("--init", "random")]
    cut = argv.index("--config")
    argv = argv[:cut] + argv[cut + 2:]  # --run-dir brings its own architecture
    assert main([*argv, "--run-dir", str(pre), "--out", str(pre), "--resume"]) == 2
    assert f"--out {pre} is a pretraining run, not a classifier to resume" in \
        one_error(capsys, "finetune classify")
    clf = fake_run(tmp_path / "clf", kind="classify")
    with pytest.raises(ValueError, match="is a classifier, not an instruction-tuned run to "
                                         "resume"):
        check_run_folder(clf, resume=True, kind="instruct")
    check_run_folder(clf, resume=True, kind="classify")


def test_a_save_cadence_is_not_part_of_a_runs_identity():
    """Every loop resumes through `check_resumable`: a changed cadence is accepted
    in any section (classify, instruct, pretraining's loop), a trained setting not."""
    saved = {"train": {"total_steps": 8, "lr": 1e-3},
             "classify": {"pooling": "last_token", "save_every": 500, "keep": 2,
                          "eval_every": 50, "log_every": 10},
             "data": {"train": 10, "sha256": "a"}}
    now = {"train": {"total_steps": 8, "lr": 1e-3},
           "classify": {"pooling": "last_token", "save_every": 1, "keep": 5,
                        "eval_every": 2, "log_every": 1},
           "data": {"train": 10, "sha256": "a"}}
    assert check_resumable("run", saved, now, 4) == []
    with pytest.raises(ValueError, match="classify.pooling: checkpoint 'last_token', now 'mean'"):
        check_resumable("run", saved, dict(now, classify=dict(now["classify"], pooling="mean")),
                        4)
    with pytest.raises(ValueError, match="data.sha256: checkpoint 'a', now 'b'"):
        check_resumable("run", saved, dict(now, data={"train": 10, "sha256": "b"}), 4)
    old = dict(saved, data={"train": 10})  # saved before the digest was recorded
    assert check_resumable("run", old, now, 4) == []


def test_batch_size_zero_is_a_sentence(tmp_path, capsys):
    assert main([*classify_argv(tmp_path), "--set", "batch_size=0",
                 "--out", str(tmp_path / "r")]) == 2
    assert "TrainConfig.batch_size must be a positive int, got 0" in \
        one_error(capsys, "finetune classify")
    assert not (tmp_path / "r").exists()


def test_a_prompt_that_is_not_utf8_names_the_flag_and_the_encoding(tmp_path, capsys):
    bad = os.fsdecode(b"caf\xe9 au lait")  # what Python makes of a Latin-1 argument
    with pytest.raises(SystemExit) as stop:
        main(["generate", "--run-dir", str(tmp_path), "--prompt", bad])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "argument --prompt: not valid UTF-8 text: byte 3 is b'\\xe9'" in err
    assert "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["classify", "--run-dir", str(tmp_path), "--text", bad])
    assert "argument --text: not valid UTF-8 text" in capsys.readouterr().err


def test_lora_export_refuses_an_existing_file(tmp_path, capsys):
    mine = tmp_path / "adapters.safetensors"
    mine.write_bytes(b"someone's adapters")
    assert main(["lora", "export", "--run-dir", str(tmp_path / "run"), "--out", str(mine)]) == 2
    assert f"--out {mine} exists; export writes a new file" in one_error(capsys, "lora")
    assert mine.read_bytes() == b"someone's adapters"
