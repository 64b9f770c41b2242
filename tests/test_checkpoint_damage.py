"""Damaged checkpoints: one line naming the checkpoint and the file, then the newest intact one."""

import json
import shutil

import jax
import numpy as np
import pytest

from jaxllm.cli import main
from jaxllm.train import checkpoint

TINY = ["pretrain", "--preset", "small", "--set", "context_length=16", "--set", "n_layers=1",
        "--set", "emb_dim=32", "--set", "n_heads=2", "--set", "batch_size=4",
        "--set", "eval_batches=1", "--set", "sample_tokens=2", "--eval-every", "4",
        "--save-every", "4", "--quiet"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run with checkpoints 4 and 8, never modified (tests damage copies)."""
    run = tmp_path_factory.mktemp("saved") / "run"
    assert main(TINY + ["--steps", "8", "--out", str(run)]) == 0
    return run


def _largest(folder):
    return max((f for f in folder.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)


# Each kind of file a checkpoint holds: array chunks, the tree's metadata, the JSON metadata.
KINDS = {
    "params chunk": lambda step: _largest(step / "params" / "ocdbt.process_0" / "d"),
    "params/d": lambda step: next((step / "params" / "d").iterdir()),
    "train chunk": lambda step: _largest(step / "train" / "ocdbt.process_0" / "d"),
    "params/_METADATA": lambda step: step / "params" / "_METADATA",
    "meta/metadata": lambda step: step / "meta" / "metadata",
}


def _damaged_copy(saved, tmp_path, kind, *, record=True):
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    step_dir = run / "checkpoints" / "8"
    victim = KINDS[kind](step_dir)
    with open(victim, "r+b") as f:
        f.truncate(max(1, victim.stat().st_size // 2))
    if not record:
        (step_dir / checkpoint.FILES_RECORD).unlink()
    return run, str(victim.relative_to(step_dir))


def _train_losses(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_saves_record_every_file(saved):
    for step in ("4", "8"):
        record = json.loads((saved / "checkpoints" / step / checkpoint.FILES_RECORD).read_text())
        assert "meta/metadata" in record and "params/_METADATA" in record
        assert any(name.startswith("train/ocdbt.process_0/d/") for name in record)
        checkpoint.verify(saved, int(step))  # intact: no error


@pytest.mark.parametrize("kind", list(KINDS))
def test_load_params_names_the_file_and_falls_back(saved, tmp_path, kind, capsys):
    run, name = _damaged_copy(saved, tmp_path, kind)
    with pytest.raises(checkpoint.CheckpointDamaged) as err:
        checkpoint.load_params(run, fallback=False)
    message = str(err.value)
    assert "\n" not in message
    if kind == "train chunk":  # load_params reads no optimizer state, but the record is checked
        assert f"checkpoints/8 is damaged: {name} has" in message
    else:
        assert f"checkpoints/8 is damaged: {name}" in message
    with pytest.raises(checkpoint.CheckpointDamaged, match=f"checkpoints/8 is damaged: {name}"):
        checkpoint.load_params(run, 8)  # a step asked for by number is never replaced
    params, config, tokenizer = checkpoint.load_params(run)
    assert "falling back to checkpoint 4" in capsys.readouterr().err
    assert _same(params, checkpoint.load_params(saved, 4)[0])
    assert tokenizer == "byte" and config.n_layers == 1


@pytest.mark.parametrize("kind", ["params chunk", "meta/metadata", "params/_METADATA"])
def test_checkpoints_without_a_record_are_checked_when_read(saved, tmp_path, kind, capsys):
    run, name = _damaged_copy(saved, tmp_path, kind, record=False)
    with pytest.raises(checkpoint.CheckpointDamaged) as err:
        checkpoint.load_params(run, fallback=False)
    message = str(err.value)
    assert "checkpoints/8 is damaged: " in message and "\n" not in message
    if kind != "params chunk":  # tensorstore's chunk errors do not always name the file
        assert name in message
    params, _, _ = checkpoint.load_params(run)
    assert "falling back to checkpoint 4" in capsys.readouterr().err
    assert _same(params, checkpoint.load_params(saved, 4)[0])


@pytest.mark.parametrize("kind", ["train chunk", "meta/metadata"])
def test_resume_falls_back_and_continues_as_the_run_did(saved, tmp_path, kind, capsys):
    run, name = _damaged_copy(saved, tmp_path, kind)
    assert main(TINY + ["--steps", "8", "--out", str(run), "--resume", "--no-fallback"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoints/8 is damaged: {name}" in err and "Traceback" not in err
    assert err.count("is damaged") == 1 and "falling back" not in err
    assert (run / "checkpoints" / "8").is_dir()  # refused: nothing moved

    assert main(TINY + ["--steps", "8", "--out", str(run), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"checkpoints/8 is damaged: {name}" in err
    assert "falling back to checkpoint 4, the newest intact one" in err
    assert err.count("is damaged") == 1 and f"resuming {run} from step 4" in err
    assert (run / "damaged" / "8" / name).is_file()  # kept, out of the run's way
    # Steps 5..8 again, from checkpoint 4: the same losses as the first time.
    assert _train_losses(run) == _train_losses(saved)
    checkpoint.verify(run, 8)
    assert _same(checkpoint.load_params(run)[0], checkpoint.load_params(saved)[0])


def test_generate_reads_the_newest_intact_checkpoint(saved, tmp_path, capsys):
    run, name = _damaged_copy(saved, tmp_path, "params chunk")
    argv = ["generate", "--run-dir", str(run), "--max-new-tokens", "2"]
    assert main(argv + ["--no-fallback"]) == 2
    assert f"checkpoints/8 is damaged: {name}" in capsys.readouterr().err
    assert main(argv) == 0
    assert "falling back to checkpoint 4" in capsys.readouterr().err


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A classification run with checkpoints 4 and 8, as `saved` has (no training)."""
    import jax.numpy as jnp

    from jaxllm.config import GPTConfig
    from jaxllm.finetune.classify import add_class_head
    from jaxllm.model import init_params
    from jaxllm.train import TrainConfig, init_train_state

    run = tmp_path_factory.mktemp("classifier") / "run"
    config = GPTConfig(vocab_size=257, context_length=16, emb_dim=32, n_heads=2, n_layers=1,
                       drop_rate=0.0)
    params = add_class_head(init_params(config, jax.random.key(0)), config, 2, jax.random.key(1))
    state = init_train_state(params, TrainConfig())
    manager = checkpoint.open_manager(run, create=True)
    for step in (4, 8):
        checkpoint.save(manager, state._replace(step=jnp.asarray(step, jnp.int32)),
                        {"model": config.to_dict(), "tokenizer": "byte", "kind": "classify",
                         "classes": ["ham", "spam"], "max_length": 16, "pad_id": 256,
                         "classify": {"pooling": "last_token"}})
    manager.close()
    return run


@pytest.mark.parametrize("command", ["classify", "chat"])
def test_classify_and_chat_fall_back_unless_told_not_to(saved, classifier, tmp_path, capsys,
                                                        command):
    """`--no-fallback` makes a damaged newest checkpoint an error (one line naming
    the checkpoint and the file, nothing printed); without it the run's newest
    intact checkpoint answers, as for `jaxllm generate`."""
    source, extra = {"classify": (classifier, ["--text", "free cash now"]),
                     "chat": (saved, ["--prompt", "Hi", "--max-new-tokens", "2"])}[command]
    run, name = _damaged_copy(source, tmp_path, "params chunk")
    argv = [command, "--run-dir", str(run), *extra]
    assert main(argv + ["--no-fallback"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"jaxllm {command}: error: ")
    assert f"checkpoints/8 is damaged: {name}" in captured.err
    assert "falling back" not in captured.err
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "falling back to checkpoint 4" in captured.err and captured.out.endswith("\n")
    if command == "classify":
        assert captured.out.split("\t")[0] in ("ham", "spam")


def test_every_checkpoint_damaged_is_an_error(saved, tmp_path):
    run, _ = _damaged_copy(saved, tmp_path, "params chunk")
    (run / "checkpoints" / "4" / "meta" / "metadata").write_text("{")
    with pytest.raises(checkpoint.CheckpointDamaged, match="every one is damaged"):
        checkpoint.load_params(run)
    with pytest.raises(checkpoint.CheckpointDamaged, match="no intact checkpoint"):
        checkpoint.newest_intact(run)


@pytest.mark.parametrize("kind", ["train chunk", "params chunk"])
def test_resume_falls_back_from_a_damaged_checkpoint_without_a_record(saved, tmp_path, kind,
                                                                      capsys):
    run, _ = _damaged_copy(saved, tmp_path, kind, record=False)
    assert main(TINY + ["--steps", "8", "--out", str(run), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "checkpoints/8 is damaged: " in err and "Traceback" not in err
    assert f"resuming {run} from step 4" in err
    assert _train_losses(run) == _train_losses(saved)
