"""Peak host memory while `jaxllm.load_hf` reads a 1B-size bf16 checkpoint.

    python -m experiments.load_rss [--preset llama-3.2-1b] [--dir /tmp/load-rss]

Writes a checkpoint of the preset's Hugging Face shapes with random bf16
values (sharded safetensors with `model.safetensors.index.json`, about 1 GB
a shard; kept in --dir for reruns), then loads it with `load_hf` in a fresh
process and reports that process's peak RSS beside the checkpoint's size and
the RSS after importing jax alone. Reading tensor by tensor, the peak is about
one copy of the weights (plus the largest tensor in flight); two full copies
would show as twice the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from experiments.common import write_report

# VmHWM: this process's own peak RSS (getrusage's ru_maxrss may carry the parent's).
_CHILD = r"""
import sys, time
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
import jax, jax.numpy as jnp
import jaxllm
base = hwm()
t0 = time.perf_counter()
params, config = jaxllm.load_hf(sys.argv[1])
jax.block_until_ready(params)
seconds = time.perf_counter() - t0
n = sum(x.size for x in jax.tree.leaves(params))
nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
peak = hwm()
print(base * 1024, peak * 1024, n, nbytes, seconds, config.param_dtype)
"""


def write_checkpoint(folder: str, preset: str, shard_bytes: int = 1 << 30) -> int:
    """A random bf16 checkpoint of the preset's Hugging Face shapes; its bytes."""
    import ml_dtypes
    from safetensors.numpy import save_file

    from jaxllm import layout
    from jaxllm.config import get_preset
    from jaxllm.hf import hf_config_dict

    config = get_preset(preset).replace(param_dtype="bfloat16")
    os.makedirs(folder, exist_ok=True)
    shapes = {k: s for k, s in layout.hf_shapes(config).items()
              if not (config.tie_embeddings and k == "lm_head.weight")}
    rng = np.random.default_rng(0)
    shards, current, size, total = [], {}, 0, 0

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(current, os.path.join(folder, name), metadata={"format": "pt"})
            shards.append((name, list(current)))
            current, size = {}, 0

    for key, shape in shapes.items():
        x = (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)
        if size + x.nbytes > shard_bytes:
            flush()
        current[key] = x
        size += x.nbytes
        total += x.nbytes
    flush()
    index = {"metadata": {"total_size": total},
             "weight_map": {k: name for name, keys in shards for k in keys}}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(hf_config_dict(config), f)
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--dir", default="/tmp/jaxllm-load-rss")
    args = ap.parse_args(argv)
    folder = os.path.join(args.dir, args.preset)
    if not os.path.exists(os.path.join(folder, "model.safetensors.index.json")):
        print(f"writing a random bf16 {args.preset} checkpoint to {folder} ...", flush=True)
        write_checkpoint(folder, args.preset)
    on_disk = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
                  if f.endswith(".safetensors"))
    out = subprocess.run([sys.executable, "-c", _CHILD, folder], capture_output=True, text=True,
                         check=True).stdout.split()
    base, peak, n, nbytes, seconds = int(out[0]), int(out[1]), int(out[2]), int(out[3]), float(out[4])
    gib = 2 ** 30
    result = {"preset": args.preset, "params": n, "param_dtype": out[5],
              "checkpoint_gib": on_disk / gib, "params_gib": nbytes / gib,
              "rss_after_import_gib": base / gib, "peak_rss_gib": peak / gib,
              "peak_minus_import_gib": (peak - base) / gib, "load_seconds": seconds}
    write_report("load_rss", result, "# load_hf peak RSS\n\n" + "\n".join(
        f"- {k}: {v:.3f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
