"""Checkpoints of trees that `init_params` does not build: a classification head
beside the GPT parameters, a custom optax chain, an optimizer over a trainable
subset (moments with None holes). Saved and restored with and without a target,
on one device here and sharded over 4 fake CPU devices in a subprocess
(``python tests/test_checkpoint_trees.py OUT_DIR``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import jaxllm
from jaxllm import sharding as sh
from jaxllm.model import init_params
from jaxllm.train import checkpoint
from jaxllm.train.optim import TrainConfig
from jaxllm.train.step import TrainState, init_train_state
from jaxllm.train.task import partition, trainable_mask

REPO = Path(__file__).resolve().parents[1]
CONFIG = jaxllm.get_preset("small").replace(n_layers=2, emb_dim=32, n_heads=2, vocab_size=64,
                                            context_length=16)
TC = TrainConfig()
HEAD = r"cls_head/.*|blocks/1/.*"  # the trainable subset: the new head and the last block


def with_head(key=0):
    params = init_params(CONFIG, jax.random.key(key))
    k1, k2 = jax.random.split(jax.random.key(key + 1))
    params["cls_head"] = {"kernel": jax.random.normal(k1, (CONFIG.emb_dim, 3)),
                          "bias": jax.random.normal(k2, (3,))}
    return params


OPTIMIZERS = {
    # every leaf trained, by a chain whose states are an EmptyState and a momentum trace
    "clip_sgd": (lambda: optax.chain(optax.clip(1.0), optax.sgd(0.1, momentum=0.9)), None),
    # AdamW over the head and the last block only: mu and nu have None where frozen
    "adamw_subset": (lambda: optax.adamw(1e-2), HEAD),
}


def make_state(kind: str, key=0) -> TrainState:
    """A state of the extra-leaf tree with non-zero optimizer moments (a few
    updates from random gradients), its optimizer state built on the trainable
    subtree by hand: frozen leaves set to None."""
    make_opt, trainable = OPTIMIZERS[kind]
    opt = make_opt()
    params = with_head(key)
    train_params, _ = partition(params, trainable_mask(params, trainable))
    opt_state = opt.init(train_params)
    for i in range(2):
        grads = jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 2.0)), train_params)
        _, opt_state = opt.update(grads, opt_state, train_params)
    return TrainState(step=jnp.asarray(7, jnp.int32), params=params, opt_state=opt_state,
                      rng=jax.random.key_data(jax.random.key(3)))


def table(tree) -> dict[str, np.ndarray]:
    """{path: value}: containers aside (a NamedTuple restored as a dict of its
    fields has the same paths), the leaves to compare."""
    return {sh.path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def assert_same_leaves(a, b):
    ta, tb = table(a), table(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)


def save(run_dir, state):
    manager = checkpoint.open_manager(run_dir, create=True)
    checkpoint.save(manager, state, {"model": CONFIG.to_dict(), "tokenizer": "byte"})
    manager.close()


# -- one device, in this process ---------------------------------------------------
@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_extra_leaf_and_custom_optimizer_restore_with_and_without_target(kind, tmp_path):
    state = make_state(kind)
    save(tmp_path, state)
    make_opt, trainable = OPTIMIZERS[kind]

    # With a target: the caller's own init, as shapes. Same containers back (optax NamedTuples).
    target = checkpoint.abstract_state(
        lambda: init_train_state(with_head(5), TC, make_opt(), trainable=trainable))
    restored, meta = checkpoint.restore(tmp_path, target=target)
    assert meta["step"] == 7
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    assert_same_leaves(restored, state)
    # arrays as the target work too
    again = checkpoint.restore(tmp_path, target=make_state(kind, key=9)).state
    assert jax.tree.structure(again) == jax.tree.structure(state)
    assert_same_leaves(again, state)

    # Without a target: the saved tree from its own metadata. Params come back
    # as they were (lists of blocks, the head); the optimizer state in plain containers.
    bare = checkpoint.restore(tmp_path).state
    assert isinstance(bare, TrainState)
    assert jax.tree.structure(bare.params) == jax.tree.structure(state.params)
    assert isinstance(bare.params["blocks"], list)
    assert_same_leaves(bare, state)
    assert int(bare.step) == 7

    # The shapes of the saved state, as a target: the same again.
    shapes = checkpoint.saved_state_shapes(tmp_path)
    assert_same_leaves(jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes),
                       jax.tree.map(np.zeros_like, state))
    assert_same_leaves(checkpoint.restore(tmp_path, target=shapes).state, state)

    params, config, tokenizer = checkpoint.load_params(tmp_path)
    assert config == CONFIG and tokenizer == "byte"
    assert jax.tree.structure(params) == jax.tree.structure(state.params)
    assert_same_leaves(params, state.params)
    assert params["cls_head"]["kernel"].sharding == \
        jax.sharding.SingleDeviceSharding(jax.devices()[0])


def test_a_mismatched_target_names_the_checkpoint_and_the_path(tmp_path):
    save(tmp_path, make_state("clip_sgd"))
    where = str(checkpoint.checkpoint_dir(tmp_path) / "7")
    no_head = checkpoint.abstract_train_state(
        CONFIG, TC, optimizer=optax.chain(optax.clip(1.0), optax.sgd(0.1, momentum=0.9)))
    with pytest.raises(ValueError) as err:
        checkpoint.restore(tmp_path, target=no_head)
    assert where in str(err.value)
    assert "the checkpoint has params/cls_head/bias (3,), the target does not" in str(err.value)

    wider = make_state("clip_sgd")
    wider.params["cls_head"] = {"kernel": jnp.zeros((CONFIG.emb_dim, 4)), "bias": jnp.zeros(4)}
    with pytest.raises(ValueError, match=r"params/cls_head/bias has shape \(3,\) in the "
                                         r"checkpoint, \(4,\) in the target"):
        checkpoint.restore(tmp_path, target=wider)

    # another optimizer: the parameters match, the optimizer state does not
    adam = checkpoint.abstract_state(lambda: init_train_state(with_head(), TC, optax.adam(1e-3)))
    with pytest.raises(ValueError, match=r"checkpoints/7: the target has train/opt_state/0/count"):
        checkpoint.restore(tmp_path, target=adam)


def test_abstract_train_state_takes_the_callers_state():
    state = make_state("adamw_subset")
    abstract = checkpoint.abstract_train_state(CONFIG, TC, state=state)
    assert jax.tree.structure(abstract) == jax.tree.structure(state)
    assert abstract.params["cls_head"]["kernel"].shape == (CONFIG.emb_dim, 3)
    assert jax.tree.structure(sh.abstract_train_state(CONFIG, TC, state=state)) == \
        jax.tree.structure(state)


def test_unmatched_parameters_are_replicated_with_one_warning():
    mesh = sh.make_mesh("fsdp=1")
    params = with_head()
    params["blocks"][0]["attn"]["qkv"]["lora_a"] = jnp.zeros((CONFIG.emb_dim, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        specs = sh.param_specs(params, mesh)
    messages = [str(w.message) for w in caught if "partition rule" in str(w.message)]
    assert len(messages) == 1, messages
    assert "2 parameter(s)" in messages[0]
    assert "cls_head/kernel (32, 3)" in messages[0]
    assert "blocks/0/attn/qkv/lora_a (32, 2)" in messages[0]
    assert specs["cls_head"]["kernel"] == P() and specs["cls_head"]["bias"] == P()
    assert specs["blocks"][0]["attn"]["qkv"]["lora_a"] == P()
    assert specs["blocks"][0]["attn"]["qkv"]["kernel"] == P("fsdp", None)
    with pytest.raises(ValueError, match=r"parameter blocks/0/attn/qkv/lora_a \(shape \(32, 2\)\) "
                                         r"matches no partition rule \(strict mode\)"):
        sh.param_specs(params, mesh, strict=True)
    # a rule for the head: no warning
    rules = ((r"cls_head/kernel", P("fsdp", None)), (r".*/lora_a", P()), *sh.DEFAULT_RULES)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sh.param_specs(params, mesh, rules)["cls_head"]["kernel"] == P("fsdp", None)


@pytest.mark.parametrize("kind", [*sorted(OPTIMIZERS), "multi_transform"])
def test_optimizer_state_over_a_subset_follows_its_parameters(kind):
    mesh = sh.make_mesh("fsdp=1")
    rules = ((r"cls_head/kernel", P(None, "fsdp")), *sh.DEFAULT_RULES)
    if kind == "multi_transform":
        params = with_head()
        labels = jax.tree.map(lambda m: "train" if m else "freeze", trainable_mask(params, HEAD))
        opt = optax.multi_transform({"train": optax.adam(1e-3), "freeze": optax.set_to_zero()},
                                    labels)
        state = init_train_state(params, TC, opt)
    else:
        state = make_state(kind)
    shardings = sh.train_state_shardings(jax.eval_shape(lambda: state), mesh, rules)
    assert jax.tree.structure(shardings.opt_state) == jax.tree.structure(state.opt_state)

    def flat(tree):
        return {sh.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(
            tree, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]}

    param_sh, param_shape = flat(shardings.params), table(state.params)
    opt_shape = {k: v.shape for k, v in table(state.opt_state).items()}
    moments = {}
    for path, sharding in flat(shardings.opt_state).items():
        owner = [k for k in param_sh if path.endswith("/" + k)]
        if owner and opt_shape[path] == param_shape[owner[0]].shape:
            moments[path] = sharding.spec
            assert sharding == param_sh[owner[0]], path
        else:
            assert sharding.spec == P(), path  # counts
    # the head's moments take its own rule (columns split), the block's its rows
    assert any(p.endswith("cls_head/kernel") and s == P(None, "fsdp") for p, s in moments.items())
    assert any(p.endswith("blocks/1/ffn/fc/kernel") and s == P("fsdp", None)
               for p, s in moments.items())
    # frozen leaves have no moments
    assert any("blocks/0/" in p for p in moments) == (kind == "clip_sgd")


# -- 4 fake devices, in one subprocess ------------------------------------------------
@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
    out = tmp_path_factory.mktemp("checkpoint_trees")
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    proc = subprocess.run([sys.executable, __file__, str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_checkpoints_of_custom_trees_restore_onto_any_mesh(four_devices):
    report = four_devices
    assert report["device_count"] == 4
    for kind in OPTIMIZERS:
        r = report[kind]
        assert r["saved_qkv_shards"] == 4  # saved from its shards
        assert r["unmatched_warnings"] == 1  # cls_head/kernel, replicated
        for spec, mesh, n in (("fsdp=4", "data=1,fsdp=4", 4), ("data=2,fsdp=2", "data=2,fsdp=2", 4),
                              ("data=1", "data=1,fsdp=1", 1)):
            got = r["restored"][spec]
            assert got["equal"] and got["same_structure"], (kind, spec)
            assert got["mesh"] == mesh and got["n_devices"] == n, (kind, spec)
            assert got["moment_sharding_follows_params"], (kind, spec)
            assert got["head_replicated"], (kind, spec)
        assert r["no_target_equal"] and r["no_target_one_device"]
        assert r["saved_shapes_target_equal"]


def _worker(out_dir: str) -> dict:
    """Save each state sharded over fsdp=4; restore it onto three layouts with
    targets from `abstract_sharded_state(state=...)`, and without a target."""
    assert jax.device_count() == 4, jax.devices()
    report = {"device_count": jax.device_count()}
    for kind in sorted(OPTIMIZERS):
        state = make_state(kind)
        mesh = sh.make_mesh("fsdp=4")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sharded = sh.shard_train_state(state, mesh)
        r = {"unmatched_warnings": sum("partition rule" in str(w.message) for w in caught),
             "saved_qkv_shards": len({str(s.index) for s in
                                      sharded.params["blocks"][1]["attn"]["qkv"]["kernel"]
                                      .addressable_shards})}
        run_dir = os.path.join(out_dir, kind)
        save(run_dir, sharded)
        r["restored"] = {}
        for spec, devices in (("fsdp=4", None), ("data=2,fsdp=2", None),
                              ("data=1", jax.devices()[:1])):
            m = sh.make_mesh(spec, devices)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                target = sh.abstract_sharded_state(CONFIG, TC, m, state=jax.eval_shape(lambda: state))
            got = checkpoint.restore(run_dir, target=target).state
            qkv = got.params["blocks"][1]["attn"]["qkv"]["kernel"]
            opt_leaves = jax.tree_util.tree_flatten_with_path(got.opt_state)[0]
            qkv_moments = [a for p, a in opt_leaves
                           if sh.path_str(p).endswith("blocks/1/attn/qkv/kernel")]
            r["restored"][spec] = {
                "equal": _same(got, state),
                "same_structure": jax.tree.structure(got) == jax.tree.structure(state),
                "mesh": sh.mesh_description(qkv.sharding.mesh),
                "n_devices": len(qkv.sharding.device_set),
                "moment_sharding_follows_params": bool(qkv_moments) and all(
                    a.sharding == qkv.sharding for a in qkv_moments),
                "head_replicated": got.params["cls_head"]["kernel"].sharding.spec == P(),
            }
        bare = checkpoint.restore(run_dir).state
        r["no_target_equal"] = _same(bare, state)
        r["no_target_one_device"] = all(len(a.sharding.device_set) == 1
                                        for a in jax.tree.leaves(bare))
        shapes = checkpoint.saved_state_shapes(run_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            target = sh.abstract_sharded_state(CONFIG, TC, mesh, state=shapes)
        r["saved_shapes_target_equal"] = _same(checkpoint.restore(run_dir, target=target).state,
                                               state)
        report[kind] = r
    return report


def _same(a, b) -> bool:
    ta, tb = table(a), table(b)
    return ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and np.array_equal(ta[k], tb[k]) for k in ta)


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1])))
