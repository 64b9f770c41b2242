"""Multi-device checks of jaxllm.sharding on 8 fake CPU devices.

Run by tests/test_sharding.py in a subprocess, since the device count is fixed
when JAX starts: ``python tests/sharding_worker.py OUT_DIR``. Prints one JSON
object (the measurements; the test asserts on them) as its last line.
"""

from __future__ import annotations

import os
import socket
import sys

# 8 host devices; LLVM optimisation off halves the compile time (every run
# compared here, the single-device reference included, runs under it).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()

import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from jaxllm import sharding as sh  # noqa: E402



def _mean(sums) -> float:
    """The mean loss of an eval step's sums."""
    return float(sums["loss_sum"] / sums["count"])

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


# A one-process "cluster": exercises the wrapper for real before any device use.
sh.initialize_distributed(f"localhost:{free_port()}", 1, 0)

import jax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from jaxllm import layout  # noqa: E402
from jaxllm.config import GPTConfig  # noqa: E402
from jaxllm.model import init_params  # noqa: E402
from jaxllm.train.task import lm_batch  # noqa: E402
from jaxllm.data import default_corpus_documents, tokenize_documents  # noqa: E402
from jaxllm.tokenizer import ByteTokenizer  # noqa: E402
from jaxllm.train import TrainConfig, checkpoint, init_train_state, make_eval_step, make_train_step  # noqa: E402
from jaxllm.train.pretrain import LoopConfig, train  # noqa: E402

CONFIG = GPTConfig(vocab_size=128, context_length=32, emb_dim=64, n_heads=4, n_layers=2,
                   drop_rate=0.0)
FAMILIES = {
    "llama": GPTConfig(vocab_size=128, context_length=32, emb_dim=64, n_heads=4, n_kv_heads=2,
                       n_layers=2, ffn_dim=128, norm="rmsnorm", positions="rope", mlp="swiglu",
                       qkv_bias=False, out_bias=False, mlp_bias=False, drop_rate=0.0,
                       rope_scaling="llama3", rope_factor=4.0, rope_original_context=16),
    "qwen3": GPTConfig(vocab_size=128, context_length=32, emb_dim=64, n_heads=4, n_kv_heads=2,
                       head_size=24, n_layers=2, ffn_dim=128, norm="rmsnorm", positions="rope",
                       mlp="swiglu", qkv_bias=False, out_bias=False, mlp_bias=False,
                       qk_norm=True, tie_embeddings=True, drop_rate=0.0),
}
TC = TrainConfig(lr=1e-3, warmup_steps=1, total_steps=10, batch_size=16)
STEPS = 3
MESHES = ("data=8", "fsdp=8", "data=2,fsdp=4")


def init_state(config: GPTConfig, tc: TrainConfig):
    """A fresh single-device TrainState (one compiled program, not op by op)."""
    return jax.jit(lambda key: init_train_state(init_params(config, key), tc))(
        jax.random.key(tc.seed))


def batches(n: int):
    rng = np.random.default_rng(0)
    return [(rng.integers(0, CONFIG.vocab_size, (16, 32), dtype=np.int32),
             rng.integers(0, CONFIG.vocab_size, (16, 32), dtype=np.int32)) for _ in range(n)]


def max_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def error_of(fn) -> str | None:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def main(out_dir: str) -> dict:
    report: dict = {"process_count": jax.process_count(), "device_count": jax.device_count()}
    seconds = report["seconds"] = {}
    clock = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        seconds[name] = round(now - clock[0], 2)
        clock[0] = now

    data = batches(STEPS + 1)
    ev_in, ev_tg = data[-1]

    # Single device, no mesh: the plain jitted step is the reference.
    ref = init_state(CONFIG, TC)
    ref_step, ref_eval = make_train_step(CONFIG, TC), make_eval_step(CONFIG)
    ref_losses = []
    for x, y in data[:STEPS]:
        ref, m = ref_step(ref, lm_batch(x, y))
        ref_losses.append(float(m["loss"]))
    report["ref_losses"] = ref_losses
    report["ref_eval"] = _mean(ref_eval(ref.params, lm_batch(ev_in, ev_tg)))
    lap("reference")

    states, steps = {}, {}
    for spec in MESHES:
        mesh = sh.make_mesh(spec)
        if spec == "fsdp=8":  # created in its shards, never whole on one device
            state = sh.init_sharded_train_state(CONFIG, TC, mesh)
        else:  # placed from a single-device state
            state = sh.shard_train_state(
                init_state(CONFIG, TC), mesh)
        step = sh.make_sharded_train_step(CONFIG, TC, mesh)
        losses = []
        for x, y in data[:STEPS]:
            state, m = step(state, lm_batch(x, y))
            losses.append(float(m["loss"]))
        entry = {"losses": losses, "params_diff": max_diff(state.params, ref.params),
                 "opt_state_diff": max_diff(state.opt_state, ref.opt_state),
                 "step": int(state.step)}
        if spec == "data=2,fsdp=4":
            ev = sh.make_sharded_eval_step(CONFIG, mesh, step.state_shardings.params)
            entry["eval"] = _mean(ev(state.params, lm_batch(ev_in, ev_tg)))
            # A partial batch (12 rows on 8 devices) is evaluated replicated.
            entry["eval_partial"] = _mean(ev(state.params, lm_batch(ev_in[:12], ev_tg[:12])))
            entry["ref_eval_partial"] = _mean(ref_eval(ref.params, lm_batch(ev_in[:12], ev_tg[:12])))
        report[spec] = entry
        states[spec], steps[spec] = (mesh, state), step
        lap(spec)

    # FSDP memory: every device holds 1/8 of each matrix and of its Adam moments.
    mesh, state = states["fsdp=8"]
    adam = state.opt_state[1][0]  # chain(clip, adamw) -> adamw's ScaleByAdamState
    fractions, replicated_vectors = {}, []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]:
        name = sh.path_str(path)
        tree_leaves = {"params": leaf}
        for moment in ("mu", "nu"):
            sub = getattr(adam, moment)
            for p in path:
                sub = sub[p.key if hasattr(p, "key") else p.idx]
            tree_leaves[moment] = sub
        for kind, arr in tree_leaves.items():
            shard_sizes = {int(np.prod(s.data.shape)) for s in arr.addressable_shards}
            if leaf.ndim >= 2:
                fractions[f"{kind}:{name}"] = [len(arr.addressable_shards),
                                               sorted(shard_sizes), int(arr.size)]
            elif shard_sizes != {int(arr.size)}:
                replicated_vectors.append(f"{kind}:{name}")
    report["fsdp8_matrix_shards"] = fractions
    report["fsdp8_vectors_not_replicated"] = replicated_vectors
    report["fsdp8_count_sharding"] = str(adam.count.sharding.spec)
    lap("fsdp8_shards")

    # Sharded checkpoint: saved on fsdp=8, restored onto 1 device and onto data=2,fsdp=4.
    run_dir = os.path.join(out_dir, "fsdp8")
    manager = checkpoint.open_manager(run_dir, create=True)
    checkpoint.save(manager, state, {"note": "saved on fsdp=8"})
    manager.close()
    restored = {}
    for spec, devices in (("data=1", jax.devices()[:1]), ("data=2,fsdp=4", None)):
        target_mesh = sh.make_mesh(spec, devices)
        r = checkpoint.restore(run_dir, target=sh.abstract_sharded_state(CONFIG, TC, target_mesh)).state
        qkv = r.params["blocks"][0]["attn"]["qkv"]["kernel"]
        restored[spec] = {
            "equal": max_diff(r, state) == 0.0,
            "mesh": sh.mesh_description(qkv.sharding.mesh),
            "qkv_shard_shape": list(qkv.addressable_shards[0].data.shape),
            "n_shards": len(qkv.addressable_shards),
        }
        if spec == "data=2,fsdp=4":
            # One more step from the restored state matches one more step of the reference.
            step = steps[spec]  # same mesh shape, so the compiled step is reused
            x, y = data[STEPS]
            r, m = step(r, lm_batch(x, y))
            ref, mr = ref_step(ref, lm_batch(x, y))
            restored[spec]["next_loss_diff"] = abs(float(m["loss"]) - float(mr["loss"]))
            restored[spec]["next_params_diff"] = max_diff(r.params, ref.params)
    report["restored"] = restored
    lap("checkpoint")

    # The training loop: one device straight through, against fsdp=8 stopped
    # at step 2 and resumed from its sharded checkpoint on data=2,fsdp=4. With
    # dropout and gradient accumulation: the masks depend on (seed, step) only
    # (partitionable threefry), so the sharded steps still equal one device.
    tok = ByteTokenizer()
    tokens = tokenize_documents(default_corpus_documents()[:1], tok)[:4000]
    # 257 rows: the embedding falls back to a split by column.
    config_l = CONFIG.replace(vocab_size=tok.vocab_size, drop_rate=0.1)
    tc_l = TC.replace(total_steps=4, grad_accum=2)
    lc = LoopConfig(eval_every=100, eval_batches=1, log_every=1, save_every=100,
                    sample_prompt="The ", sample_tokens=2, temperature=0.0)

    def run(name, **kwargs):
        train(os.path.join(out_dir, name), config_l, tc_l, lc, tok, tokens, progress=False,
              **kwargs)
        with open(os.path.join(out_dir, name, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f]

    straight = run("loop_one_device")
    run("loop_sharded", mesh=sh.make_mesh("fsdp=8"), stop_at=2)
    resumed = run("loop_sharded", mesh=sh.make_mesh("data=2,fsdp=4"), resume=True)
    one = checkpoint.restore(os.path.join(out_dir, "loop_one_device")).state
    sharded = checkpoint.restore(os.path.join(out_dir, "loop_sharded")).state  # onto one device
    report["loop"] = {
        "straight": [(r["step"], r["loss"]) for r in straight if r["kind"] == "train"],
        "resumed": [(r["step"], r["loss"]) for r in resumed if r["kind"] == "train"],
        "val_loss": [[r["val_loss"] for r in recs if r["kind"] == "eval"][-1]
                     for recs in (straight, resumed)],
        "final_params_diff": max_diff(sharded.params, one.params),
        "final_step": int(sharded.step),
        "meta_mesh": checkpoint.read_meta(os.path.join(out_dir, "loop_sharded"))["mesh"],
    }
    lap("loop")

    # Llama 3 and Qwen3 (GQA, RoPE, SwiGLU; Qwen3's qk norms and tied head) on
    # fsdp=8 and data=2,fsdp=4 under the default rules: equal to one device,
    # every matrix in 8 shards, every vector replicated.
    families = report["families"] = {}
    for name, config in FAMILIES.items():
        ref = init_state(config, TC)
        ref_step = make_train_step(config, TC)
        ref_losses = []
        for x, y in data[:2]:
            ref, m = ref_step(ref, lm_batch(x, y))
            ref_losses.append(float(m["loss"]))
        for spec in ("fsdp=8", "data=2,fsdp=4"):
            mesh = sh.make_mesh(spec)
            state = sh.init_sharded_train_state(config, TC, mesh)
            step = sh.make_sharded_train_step(config, TC, mesh)
            losses = []
            for x, y in data[:2]:
                state, m = step(state, lm_batch(x, y))
                losses.append(float(m["loss"]))
            shards = {sh.path_str(path): [len(leaf.addressable_shards),
                                          sorted({int(np.prod(s.data.shape))
                                                  for s in leaf.addressable_shards}),
                                          int(leaf.size), leaf.ndim]
                      for path, leaf in jax.tree_util.tree_flatten_with_path(state.params)[0]}
            families[f"{name} {spec}"] = {
                "losses": losses, "ref_losses": ref_losses,
                "params_diff": max_diff(state.params, ref.params), "shards": shards,
                "family_tree": sorted(shards) == sorted(layout.param_shapes(config))}
    lap("families")

    # Errors that name what does not fit.
    mesh8, step8 = states["data=8"][0], steps["data=8"]
    x, y = data[0]
    report["err_batch"] = error_of(lambda: step8(states["data=8"][1], lm_batch(x[:12], y[:12])))
    report["err_mesh_size"] = error_of(lambda: sh.make_mesh("data=2,fsdp=2"))
    abstract = sh.abstract_train_state(CONFIG.replace(vocab_size=100), TC)
    report["err_not_divisible"] = error_of(lambda: sh.param_specs(
        abstract.params, states["fsdp=8"][0],
        [(r"tok_emb/embedding", P("fsdp", None))] + list(sh.DEFAULT_RULES)))
    report["fallback_spec"] = str(sh.param_specs(abstract.params, states["fsdp=8"][0])
                                  ["tok_emb"]["embedding"])
    report["err_unused_rule"] = error_of(lambda: sh.param_specs(
        abstract.params, mesh8, list(sh.DEFAULT_RULES) + [(r"lora/.*", P())], strict=True))
    lap("errors")
    return report


if __name__ == "__main__":
    result = main(sys.argv[1])
    jax.distributed.shutdown()
    print(json.dumps(result))
