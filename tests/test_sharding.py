"""jaxllm.sharding: mesh specs, partition rules, and (in a subprocess with 8
fake CPU devices) data parallel and FSDP training equal to one device."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import device_worker
from jax.sharding import PartitionSpec as P

from jaxllm import sharding as sh
from jaxllm.config import GPTConfig
from jaxllm.train import TrainConfig

REPO = Path(__file__).resolve().parents[1]
CONFIG = GPTConfig(vocab_size=128, context_length=32, emb_dim=64, n_heads=4, n_layers=2,
                   drop_rate=0.0)


# -- in this process (one device) -------------------------------------------------
def test_parse_mesh_spec():
    assert sh.parse_mesh_spec("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
    assert sh.parse_mesh_spec(" fsdp=4 , data=2 ") == {"data": 2, "fsdp": 4}
    assert sh.parse_mesh_spec("data=8") == {"data": 8, "fsdp": 1}
    assert sh.parse_mesh_spec("data=2,fsdp=-1", 8) == {"data": 2, "fsdp": 4}
    assert sh.parse_mesh_spec("", 8) == {"data": 1, "fsdp": 8}


@pytest.mark.parametrize("spec, devices, match", [
    ("data=2,tensor=2", None, "unknown axis 'tensor'"),
    ("data", None, "expected AXIS=SIZE"),
    ("data=two", None, "must be an int"),
    ("data=0", None, "must be positive or -1"),
    ("data=2,data=2", None, "given twice"),
    ("data=-1,fsdp=-1", 8, "only one axis may be -1"),
    ("data=3,fsdp=-1", 8, "do not divide"),
    ("fsdp=-1", None, "needs the device count"),
])
def test_parse_mesh_spec_errors(spec, devices, match):
    with pytest.raises(ValueError, match=match):
        sh.parse_mesh_spec(spec, devices)


def test_make_mesh_one_device_and_size_mismatch():
    mesh = sh.make_mesh("data=1")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1}
    assert sh.mesh_description(mesh) == "data=1,fsdp=1"
    with pytest.raises(ValueError, match=r"has 2 devices but there are 1"):
        sh.make_mesh("data=2")


def test_a_sharded_step_made_for_another_tree_says_to_pass_the_state():
    from jaxllm.model import init_params
    from jaxllm.train import init_train_state

    tc = TrainConfig(batch_size=2, total_steps=2)
    mesh = sh.make_mesh("data=1")
    params = init_params(CONFIG, jax.random.key(0))
    params["head"] = {"kernel": np.zeros((CONFIG.emb_dim, 2), np.float32)}
    state = init_train_state(params, tc)
    tokens = np.zeros((2, 8), np.int32)
    batch = {"tokens": tokens, "targets": tokens}
    with pytest.raises(ValueError, match=r"pass it when building the step: "
                                         r"make_sharded_train_step\(\.\.\., state=state\)"):
        sh.make_sharded_train_step(CONFIG, tc, mesh)(state, batch)
    with pytest.warns(UserWarning, match="1 parameter.* match no partition rule.*head/kernel"):
        step = sh.make_sharded_train_step(CONFIG, tc, mesh, state=state)
    _, metrics = step(state, batch)
    assert np.isfinite(float(metrics["loss"]))


def test_default_rules_cover_every_parameter_and_pick_rows_first():
    mesh = sh.make_mesh("fsdp=1")
    llama = CONFIG.replace(norm="rmsnorm", positions="rope", mlp="swiglu", n_kv_heads=2,
                           out_bias=False, mlp_bias=False)
    for config in (CONFIG, CONFIG.replace(tie_embeddings=True, qkv_bias=True), llama,
                   llama.replace(qk_norm=True, head_size=24, tie_embeddings=True)):
        params = sh.abstract_train_state(config, TrainConfig()).params
        # strict: every parameter has a rule; the other family's rules are not "unused"
        specs = sh.param_specs(params, mesh, strict=not config.tie_embeddings)
        flat = {sh.path_str(p): s for p, s in jax.tree_util.tree_flatten_with_path(
            specs, is_leaf=lambda x: isinstance(x, P))[0]}
        shapes = {sh.path_str(p): a.shape for p, a in jax.tree_util.tree_flatten_with_path(params)[0]}
        assert flat.keys() == shapes.keys()
        for name, spec in flat.items():
            assert spec == (P("fsdp", None) if len(shapes[name]) == 2 else P()), name


def test_rule_errors_name_the_problem():
    mesh = sh.make_mesh("fsdp=1")
    params = sh.abstract_train_state(CONFIG, TrainConfig()).params
    with pytest.raises(ValueError, match=r"parameter blocks/0/norm1/scale \(shape \(64,\)\) matches no partition rule"):
        sh.param_specs(params, mesh, [(r".*kernel|.*embedding|.*bias", P())], strict=True)
    with pytest.raises(ValueError, match=r"rule\(s\) \['out_head/.*'\] match no parameter"):
        sh.param_specs(sh.abstract_train_state(CONFIG.replace(tie_embeddings=True),
                                               TrainConfig()).params,
                       mesh, sh.DEFAULT_RULES, strict=True)
    # Without strict, a rule for a parameter this config lacks is fine.
    sh.param_specs(params, mesh, list(sh.DEFAULT_RULES) + [(r"lora/.*", P())])
    with pytest.raises(ValueError, match=r"bad regex"):
        sh.param_specs(params, mesh, [(r"blocks/(", P())])
    with pytest.raises(ValueError, match=r"mesh axis 'tensor'"):
        sh.param_specs(params, mesh, [(r".*", P("tensor"))])
    with pytest.raises(ValueError, match=r"more entries than the 1 dimensions"):
        sh.param_specs(params, mesh, [(r".*", P(None, "fsdp"))])
    with pytest.raises(ValueError, match=r"must be a PartitionSpec"):
        sh.param_specs(params, mesh, [(r".*", ("fsdp",))])


def test_optimizer_state_follows_params_and_counts_are_replicated():
    mesh = sh.make_mesh("fsdp=1")
    abstract = sh.abstract_train_state(CONFIG, TrainConfig())
    shardings = sh.train_state_shardings(abstract, mesh)
    adam = shardings.opt_state[1][0]
    assert adam.mu == shardings.params and adam.nu == shardings.params
    assert adam.count.spec == P() and shardings.step.spec == P()
    assert jax.tree.structure(shardings.opt_state) == jax.tree.structure(abstract.opt_state)


def test_initialize_distributed_rejects_partial_settings(monkeypatch):
    for var in (sh.ENV_COORDINATOR, sh.ENV_NUM_PROCESSES, sh.ENV_PROCESS_ID):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match=r"also give \['process_id'\]"):
        sh.initialize_distributed("10.0.0.1:1234", 2)
    monkeypatch.setenv(sh.ENV_COORDINATOR, "10.0.0.1:1234")
    monkeypatch.setenv(sh.ENV_NUM_PROCESSES, "2")
    monkeypatch.setenv(sh.ENV_PROCESS_ID, "2")
    with pytest.raises(ValueError, match=r"process_id 2 is outside \[0, num_processes=2\)"):
        sh.initialize_distributed()
    monkeypatch.setenv(sh.ENV_PROCESS_ID, "one")
    with pytest.raises(ValueError, match=r"JAXLLM_PROCESS_ID must be an int"):
        sh.initialize_distributed()


# -- 8 fake devices, in one subprocess ------------------------------------------------
@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    return device_worker(tmp_path_factory, "sharding_worker.py")


def test_worker_sees_eight_devices_in_one_process(eight_devices):
    assert eight_devices["device_count"] == 8 and eight_devices["process_count"] == 1


@pytest.mark.parametrize("spec", ["data=8", "fsdp=8", "data=2,fsdp=4"])
def test_sharded_training_equals_one_device(eight_devices, spec):
    run = eight_devices[spec]
    assert run["step"] == 3
    np.testing.assert_allclose(run["losses"], eight_devices["ref_losses"], rtol=0, atol=1e-5)
    assert run["params_diff"] < 1e-5
    assert run["opt_state_diff"] < 1e-5


def test_sharded_eval_equals_one_device(eight_devices):
    run = eight_devices["data=2,fsdp=4"]
    assert abs(run["eval"] - eight_devices["ref_eval"]) < 1e-5
    assert abs(run["eval_partial"] - run["ref_eval_partial"]) < 1e-5


def test_fsdp_splits_every_matrix_and_its_moments_eight_ways(eight_devices):
    shards = eight_devices["fsdp8_matrix_shards"]
    # 2 layers x 4 kernels + 2 embeddings + head, each as params, mu and nu.
    assert len(shards) == 3 * (2 * 4 + 3)
    for name, (n_shards, shard_sizes, size) in shards.items():
        assert n_shards == 8 and shard_sizes == [size // 8], name
    assert eight_devices["fsdp8_vectors_not_replicated"] == []
    assert eight_devices["fsdp8_count_sharding"] == "P()"


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("spec", ["fsdp=8", "data=2,fsdp=4"])
def test_llama_and_qwen3_shard_by_the_default_rules_and_train_as_one_device(
        eight_devices, family, spec):
    run = eight_devices["families"][f"{family} {spec}"]
    np.testing.assert_allclose(run["losses"], run["ref_losses"], rtol=0, atol=1e-5)
    assert run["params_diff"] < 1e-5
    assert run["family_tree"]  # the family's own parameters (layout.param_shapes)
    assert any("/ffn/gate/" in name for name in run["shards"])
    for name, (n_shards, sizes, size, ndim) in run["shards"].items():
        # a matrix split over the fsdp devices (copied over data); a vector (norm
        # scale) whole on every device
        fsdp = 8 if spec == "fsdp=8" else 4
        expected = [size // fsdp] if ndim == 2 else [size]
        assert n_shards == 8 and sizes == expected, name


def test_checkpoint_saved_on_fsdp8_restores_onto_other_meshes(eight_devices):
    one, two_by_four = (eight_devices["restored"][k] for k in ("data=1", "data=2,fsdp=4"))
    assert one["equal"] and one["mesh"] == "data=1,fsdp=1" and one["n_shards"] == 1
    assert one["qkv_shard_shape"] == [64, 192]
    assert two_by_four["equal"] and two_by_four["mesh"] == "data=2,fsdp=4"
    assert two_by_four["n_shards"] == 8 and two_by_four["qkv_shard_shape"] == [64 // 4, 192]
    # Training goes on from the restored shards exactly as on one device.
    assert two_by_four["next_loss_diff"] < 1e-5 and two_by_four["next_params_diff"] < 1e-5


def test_errors_on_eight_devices(eight_devices):
    assert "batch of 12 sequences is not divisible" in eight_devices["err_batch"]
    assert "data=8 * fsdp=1 = 8" in eight_devices["err_batch"]
    assert "has 4 devices but there are 8" in eight_devices["err_mesh_size"]
    err = eight_devices["err_not_divisible"]
    assert "tok_emb/embedding" in err and "size 100" in err and "size 8" in err
    # The default rule falls back to the columns when the rows do not divide.
    assert eight_devices["fallback_spec"] == "P(None, 'fsdp')"
    assert "['lora/.*'] match no parameter" in eight_devices["err_unused_rule"]


def test_training_loop_on_meshes_equals_one_device(eight_devices):
    # Dropout and grad_accum=2 on; steps 1-2 on fsdp=8, 3-4 resumed on data=2,fsdp=4.
    run = eight_devices["loop"]
    assert [step for step, _ in run["straight"]] == [1, 2, 3, 4]
    assert [step for step, _ in run["resumed"]] == [1, 2, 3, 4]
    np.testing.assert_allclose([loss for _, loss in run["resumed"]],
                               [loss for _, loss in run["straight"]], rtol=0, atol=1e-5)
    assert abs(run["val_loss"][0] - run["val_loss"][1]) < 1e-5
    assert run["final_step"] == 4 and run["final_params_diff"] < 1e-5
    assert run["meta_mesh"] == "data=2,fsdp=4"


def test_cli_mesh_flag_reports_a_mesh_that_does_not_fit(tmp_path, capsys):
    from jaxllm.cli import main

    assert main(["pretrain", "--mesh", "data=2", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "mesh {'data': 2, 'fsdp': 1} has 2 devices but there are 1" in capsys.readouterr().err


# -- partition rules from a file -------------------------------------------------
def test_rules_json_round_trip_and_format():
    text = sh.rules_to_json()
    assert sh.rules_from_json(json.loads(text)) == sh.DEFAULT_RULES
    assert json.loads(text) == sh.rules_as_data()
    rules = sh.rules_from_json([{"match": "blocks/.*", "spec": [["data", "fsdp"], None]},
                                {"match": ".*", "spec": []}])
    assert rules == (("blocks/.*", P(("data", "fsdp"), None)), (".*", P()))


@pytest.mark.parametrize("data, match", [
    ({"match": ".*"}, "must be a JSON list"),
    ([{"spec": []}], r"rule #0 must be"),
    ([{"match": ".*", "spec": [], "specs": [[]]}], r"rule #0 must be"),
    ([{"match": ".*", "spec": ["tensor"]}], r"rule #0 \('\.\*'\): unknown mesh axis 'tensor'"),
    ([{"match": ".*", "spec": [1]}], "bad dimension entry 1"),
    ([{"match": ".*", "spec": "fsdp"}], "one entry per array dimension"),
    ([{"match": ".*", "specs": []}], "non-empty list"),
    ([{"match": "(", "spec": []}], r"rule #0: bad regex"),
])
def test_rules_json_errors_name_the_rule(data, match):
    with pytest.raises(ValueError, match=match):
        sh.rules_from_json(data)


def test_load_rules_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sh.load_rules(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        sh.load_rules(tmp_path / "bad.json")


def test_cli_partition_rules_reach_the_loop(tmp_path, capsys):
    """The file's rules are used (a rule naming no parameter is refused, as a likely
    typo), recorded in the run's config.json, and need a mesh."""
    from jaxllm.cli import main

    base = ["pretrain", "--preset", "small", "--steps", "2", "--eval-every", "2", "--quiet",
            "--set", "eval_batches=1", "--set", "sample_tokens=2"]
    replicate = tmp_path / "replicate.json"
    replicate.write_text('[{"match": ".*", "spec": []}]')
    assert main(base + ["--out", str(tmp_path / "run"), "--mesh", "fsdp=1",
                        "--partition-rules", str(replicate)]) == 0
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["partition_rules"] == [{"match": ".*", "spec": []}]

    typo = tmp_path / "typo.json"
    typo.write_text('[{"match": "blocks/\\\\d+/mlp/.*", "spec": []}, {"match": ".*", "spec": []}]')
    assert main(base + ["--out", str(tmp_path / "typo"), "--mesh", "fsdp=1",
                        "--partition-rules", str(typo)]) == 2
    assert "match no parameter" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "nomesh"), "--partition-rules", str(replicate)]) == 2
    assert "--partition-rules needs --mesh" in capsys.readouterr().err
