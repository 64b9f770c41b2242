"""The fine-tuning commands on a device mesh: 2 fake CPU devices, FSDP.

Run by tests/test_finetune_mesh.py in a subprocess, since the device count is
fixed when JAX starts: ``python tests/finetune_mesh_worker.py OUT_DIR``.
Prints one JSON object (what the test asserts on) as its last line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# LLVM optimisation off halves the compile time (the one-device runs compared
# here run under it too).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
                           " --xla_backend_optimization_level=0").strip()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json  # noqa: E402

import jax  # noqa: E402

from jaxllm import sharding  # noqa: E402
from tests import loop_golden  # noqa: E402


def losses(rows) -> list[float]:
    return [r["loss"] for r in rows if r["kind"] == "train"]


def main(out: Path) -> dict:
    mesh = sharding.make_mesh("fsdp=2")
    result = {"devices": jax.device_count()}
    for name in ("classify", "dpo"):  # a class head; pair batches with 1-D reference arrays
        run = loop_golden.RUNS[name]
        result[name] = {"mesh": losses(run(out / f"{name}-mesh", mesh=mesh))}
        saved = json.loads((out / f"{name}-mesh" / "config.json").read_text())
        result[name]["recorded_mesh"] = saved["mesh"]
    # stopped and resumed on the mesh: the uninterrupted mesh run's losses
    loop_golden.dpo(out / "dpo-part", mesh=mesh, stop_at=3)
    result["dpo"]["resumed"] = losses(loop_golden.dpo(out / "dpo-part", mesh=mesh, resume=True))
    # the command's --mesh
    from jaxllm.cli import main as cli

    data = out / "prefs.json"
    data.write_text(json.dumps(loop_golden._entries(40, preferences=True)))
    config = out / "tiny.json"
    config.write_text(json.dumps(loop_golden.FT_CONFIG.to_dict()))
    result["cli_rc"] = cli(["finetune", "dpo", "--init", "random", "--config", str(config),
                            "--tokenizer", "byte", "--data", str(data), "--steps", "2",
                            "--mesh", "fsdp=2", "--no-responses", "--set", "batch_size=4",
                            "--set", "sample_count=0", "--set", "eval_batches=1",
                            "--out", str(out / "cli"), "--quiet"])
    result["cli_mesh"] = json.loads((out / "cli" / "config.json").read_text())["mesh"]
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
