"""`--mesh` for fine-tuning: classification and DPO on a 2-device FSDP mesh train
as on one device, resume, and record the mesh (instruction tuning runs DPO's path
with another task: `jaxllm.train.loop`)."""

import json

import numpy as np
import pytest
from conftest import device_worker

from tests import loop_golden


@pytest.fixture(scope="module")
def two_devices(tmp_path_factory):
    return device_worker(tmp_path_factory, "finetune_mesh_worker.py")


@pytest.mark.parametrize("name", ["classify", "dpo"])
def test_fine_tuning_on_a_mesh_trains_as_on_one_device(two_devices, name):
    """The losses of the same run on one device (tests/data/loop_golden.json; the
    worker compiles without LLVM optimisation, so to rounding, not bit for bit)."""
    run = two_devices[name]
    one_device = [r["loss"] for r in json.loads(loop_golden.GOLDEN.read_text())[name]
                  if r["kind"] == "train"]
    assert two_devices["devices"] == 2 and len(run["mesh"]) == len(one_device) == 6
    np.testing.assert_allclose(run["mesh"], one_device, rtol=2e-5, atol=1e-6)
    assert "fsdp" in run["recorded_mesh"]


def test_a_sharded_dpo_run_resumes_bitwise_and_the_command_takes_mesh(two_devices):
    assert two_devices["dpo"]["resumed"] == two_devices["dpo"]["mesh"]
    assert two_devices["cli_rc"] == 0 and "fsdp" in two_devices["cli_mesh"]
