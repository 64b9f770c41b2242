"""Restore a run's latest checkpoint onto a mesh and write its parameters.

    python tests/multiprocess_worker.py RUN_DIR MESH_SPEC OUT_NPZ

Run alone (with XLA_FLAGS faking devices) or under `jaxllm launch` (it then joins
the distributed run first). Every process gathers the sharded parameters;
process 0 writes them to OUT_NPZ by path, with the device and process counts.
"""

import os
import sys

import jax
import numpy as np

from jaxllm import sharding
from jaxllm.model import init_params
from jaxllm.train import checkpoint, init_train_state
from jaxllm.train.task import path_str


def main(run_dir: str, mesh_spec: str, out: str) -> None:
    if os.environ.get(sharding.ENV_COORDINATOR):
        sharding.initialize_distributed()
    mesh = sharding.make_mesh(mesh_spec)
    config, tc = checkpoint.configs_from_meta(checkpoint.read_meta(run_dir))
    abstract = jax.eval_shape(lambda: init_train_state(init_params(config, jax.random.key(0)), tc))
    shardings = sharding.train_state_shardings(abstract, mesh)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    state = checkpoint.restore(run_dir, target=target).state
    from jax.experimental import multihost_utils

    full = multihost_utils.process_allgather(state.params, tiled=True)
    if jax.process_index() == 0:
        arrays = {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(full)}
        np.savez(out, devices=jax.device_count(), processes=jax.process_count(), **arrays)


if __name__ == "__main__":
    main(*sys.argv[1:])
