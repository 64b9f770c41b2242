"""The pretraining loop: learning, bitwise resume, checkpoint safety, divergence."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config import GPTConfig
from jaxllm.data import default_corpus_documents, tokenize_documents
from jaxllm.tokenizer import ByteTokenizer
from jaxllm.train import TrainConfig, checkpoint, loop
from jaxllm.train.pretrain import LoopConfig, TrainingDiverged, train

TOK = ByteTokenizer()
# Dropout on, so that resuming must also reproduce the dropout masks.
CONFIG = GPTConfig(vocab_size=257, context_length=16, emb_dim=32, n_heads=2, n_layers=2,
                   drop_rate=0.1)
TC = TrainConfig(total_steps=40, batch_size=8, lr=1e-2, warmup_steps=2)
LC = LoopConfig(eval_every=3, eval_batches=2, log_every=2, save_every=3, keep=2,
                sample_prompt="The ", sample_tokens=6)


@pytest.fixture(scope="module")
def tokens():
    return tokenize_documents(default_corpus_documents()[:3], TOK)[:6000]


def run(run_dir, tokens, **kwargs):
    kwargs.setdefault("progress", False)
    return train(run_dir, kwargs.pop("config", CONFIG), kwargs.pop("tc", TC),
                 kwargs.pop("lc", LC), TOK, tokens, data_name="test", **kwargs)


def losses(run_dir):
    return [json.loads(line) for line in open(run_dir / "metrics.jsonl")]


@pytest.fixture(scope="module")
def straight(tokens, tmp_path_factory):
    """Six steps without interruption."""
    run_dir = tmp_path_factory.mktemp("straight")
    run(run_dir, tokens, stop_at=6)
    return run_dir


def test_loss_decreases_and_outputs_are_written(tokens, tmp_path):
    summary = run(tmp_path, tokens)
    records = losses(tmp_path)
    steps = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, 41))
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    assert evals[0]["val_loss"] == pytest.approx(np.log(257), abs=0.3)  # untrained: near uniform
    assert evals[-1]["train_loss"] < evals[0]["train_loss"] - 1.5
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    assert np.mean([r["loss"] for r in steps[-5:]]) < np.mean([r["loss"] for r in steps[:5]]) - 1.0
    assert summary["final_val_loss"] == evals[-1]["val_loss"]
    assert summary["tokens_seen"] == 40 * 8 * 16 == steps[-1]["tokens"]
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    text = (tmp_path / "samples.txt").read_text()
    assert "== step 40" in text and "The " in text
    assert checkpoint.open_manager(tmp_path).all_steps() == [39, 40]  # keep=2


def test_resume_is_bitwise_identical(tokens, straight, tmp_path):
    first = run(tmp_path, tokens, stop_at=3)
    assert first["last_checkpoint"] == 3
    second = run(tmp_path, tokens, stop_at=6, resume=True)
    assert second["resumed_from"] == 3
    assert (tmp_path / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()
    a = checkpoint.restore(straight).state
    b = checkpoint.restore(tmp_path).state
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert int(b.step) == 6


def test_steps_are_built_once_per_configuration():
    """A resume in the same process reuses the compiled steps of the first run."""
    from jaxllm.train.task import lm_task

    def steps(tc):
        return loop._steps(CONFIG, tc, None, lm_task, None)

    assert steps(TC) is steps(TC)
    assert steps(TC) is not steps(TC.replace(lr=2e-2))


def test_only_the_first_process_writes_run_files(tokens, straight, tmp_path, monkeypatch):
    """A second host of a multi-host run trains and checkpoints like the first
    but leaves the metrics, plots, samples and summary to process 0."""
    monkeypatch.setattr(loop, "_is_writer", lambda: False)
    summary = run(tmp_path, tokens, stop_at=6)
    written = {p.name for p in tmp_path.iterdir()}
    assert not written & {"metrics.jsonl", "loss.png", "samples.txt", "summary.json", "config.json"}
    assert checkpoint.open_manager(tmp_path).latest_step() == 6
    # its own view of the run is still complete, and equal to process 0's
    evals = [r for r in losses(straight) if r["kind"] == "eval"]
    assert summary["final_val_loss"] == evals[-1]["val_loss"]
    assert summary["initial_val_loss"] == evals[0]["val_loss"]


def test_resume_skips_half_written_checkpoint(tokens, straight, tmp_path):
    run(tmp_path, tokens, stop_at=3)
    ckpts = checkpoint.checkpoint_dir(tmp_path)
    # A save of step 6 killed midway: Orbax's temporary folder, never renamed.
    torn = ckpts / "6.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(ckpts / "3", torn)
    shutil.rmtree(torn / "params")
    assert checkpoint.restore(tmp_path).meta["step"] == 3
    summary = run(tmp_path, tokens, stop_at=6, resume=True)
    assert summary["resumed_from"] == 3
    assert not torn.exists()  # cleaned up
    assert (tmp_path / "metrics.jsonl").read_text() == (straight / "metrics.jsonl").read_text()


def test_different_config_is_refused(tokens, straight, tmp_path):
    shutil.copytree(straight, tmp_path, dirs_exist_ok=True)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        run(tmp_path, tokens)
    with pytest.raises(ValueError) as err:
        run(tmp_path, tokens, resume=True, config=CONFIG.replace(emb_dim=64),
            tc=TC.replace(lr=3e-3))
    message = str(err.value)
    assert "model.emb_dim: checkpoint 32, now 64" in message
    assert "train.lr: checkpoint 0.01, now 0.003" in message
    assert "n_layers" not in message
    with pytest.raises(ValueError, match="data.max_length: checkpoint 16, now 8"):
        run(tmp_path, tokens, resume=True, lc=LC.replace(max_length=8))


def test_restore_onto_target_and_load_params(straight):
    state, meta = checkpoint.restore(straight)
    assert meta["step"] == 6 and meta["data_position"] == 6 and meta["tokenizer"] == "byte"
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype,
                                       sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
        state)
    again = checkpoint.restore(straight, step=6, target=target).state
    assert jax.tree.structure(again) == jax.tree.structure(state)
    params, config, tokenizer = checkpoint.load_params(straight)
    assert config == CONFIG and tokenizer == "byte"
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(ValueError, match=r"no checkpoint for step 5.*\[3, 6\]"):
        checkpoint.restore(straight, step=5)
    with pytest.raises(FileNotFoundError, match="no checkpoints"):
        checkpoint.load_params(straight / "nowhere")


def poison_after(monkeypatch, step):
    """Make the train step write NaN into the parameters from `step` on."""
    real_train, real_eval = loop._steps(CONFIG, TC)

    def poisoned(state, batch):
        state, metrics = real_train(state, batch)
        if int(state.step) >= step:
            state = state._replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))
        return state, metrics

    monkeypatch.setattr(loop, "_steps", lambda *args: (poisoned, real_eval))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tokens, tmp_path, monkeypatch):
    poison_after(monkeypatch, 5)  # params NaN after step 5, so step 6 reports a NaN loss
    with pytest.raises(TrainingDiverged, match="loss is nan at step 6.*last good checkpoint is "
                                               "step 3") as err:
        run(tmp_path, tokens, lc=LC.replace(log_every=1))
    assert err.value.step == 6 and err.value.last_checkpoint == 3
    assert checkpoint.open_manager(tmp_path).all_steps() == [3]
    params, _, _ = checkpoint.load_params(tmp_path)
    assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(params))
    assert max(r["step"] for r in losses(tmp_path)) == 5  # the NaN step is not logged


def test_non_finite_params_are_never_saved(tokens, tmp_path, monkeypatch):
    poison_after(monkeypatch, 6)  # step 6's own loss is still finite; its update is not
    with pytest.raises(TrainingDiverged, match="parameters are not finite at step 6"):
        run(tmp_path, tokens)
    assert checkpoint.open_manager(tmp_path).all_steps() == [3]


def test_bad_loop_settings(tokens, tmp_path):
    with pytest.raises(ValueError, match="LoopConfig.eval_every must be a positive int, got 0"):
        LoopConfig(eval_every=0)
    with pytest.raises(ValueError, match="max_length 32 exceeds the context length 16"):
        run(tmp_path, tokens, lc=LC.replace(max_length=32))
    with pytest.raises(ValueError, match="validation split is too short: found 15 tokens"):
        run(tmp_path, tokens[:150])


def test_an_unmatched_parameter_is_warned_of_once_on_a_mesh(tmp_path, tokens):
    from jaxllm import sharding
    from jaxllm.model import init_params

    params = init_params(CONFIG, jax.random.key(0))
    params["temp"] = {"t": jnp.ones((3,), jnp.float32)}  # no rule names it: replicated
    with pytest.warns(UserWarning, match="match no partition rule") as caught:
        run(tmp_path / "run", tokens, tc=TC.replace(total_steps=2), params=params,
            mesh=sharding.make_mesh("data=1"))
    assert len([w for w in caught if "partition rule" in str(w.message)]) == 1


def test_a_task_of_its_own_trains_on_the_batches_make_batch_builds(tmp_path, tokens):
    from jaxllm.train.task import lm_batch, lm_task

    def second_half(params, batch, config, rng):  # the loss on the second half of each window
        return lm_task(params, lm_batch(batch["tokens"], batch["targets"], batch["late"]),
                       config, rng)

    def make_batch(x, y):
        late = np.zeros_like(y)
        late[:, y.shape[1] // 2:] = 1
        return {"tokens": x, "targets": y, "late": late}

    tc = TC.replace(total_steps=3)
    with pytest.raises(ValueError, match=r"the task looked up 'late', which neither the batch"):
        run(tmp_path / "plain", tokens, tc=tc, task=second_half)
    summary = run(tmp_path / "own", tokens, tc=tc, task=second_half, make_batch=make_batch)
    rows = [r for r in losses(tmp_path / "own") if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2, 3] and np.isfinite(summary["final_val_loss"])
    plain = run(tmp_path / "lm", tokens, tc=tc)
    assert summary["final_val_loss"] != plain["final_val_loss"]
