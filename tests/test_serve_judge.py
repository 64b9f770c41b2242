"""`finetune instruct --judge-url` against `jaxllm serve` of another model:
two real processes on 127.0.0.1. The judge is a tiny model built to answer
"42" (a bigram table: after the prompt's last newline "4", then "2", then
end-of-text), so every response must come back scored 42."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import transformers

import jaxllm
from jaxllm.hf import hf_config_kwargs, save_safetensors
from test_serve_api import free_port, start_server, stop_server

JUDGE = jaxllm.GPTConfig(vocab_size=257, context_length=1024, emb_dim=64, n_heads=4,
                         n_layers=1, drop_rate=0.0, qkv_bias=True, tie_embeddings=False)
NEXT = {ord("\n"): ord("4"), ord("4"): ord("2"), ord("2"): 256}  # 256: end-of-text


def bigram_judge():
    """Blocks that add nothing and no positions: the logits depend on the last
    token alone, through an output head that maps it to its NEXT."""
    p = jaxllm.init_params(JUDGE, jax.random.PRNGKey(0))
    p["pos_emb"]["embedding"] = jnp.zeros_like(p["pos_emb"]["embedding"])
    for blk in p["blocks"]:
        for layer in (blk["attn"]["out"], blk["ffn"]["proj"]):
            layer["kernel"] = jnp.zeros_like(layer["kernel"])
            layer["bias"] = jnp.zeros_like(layer["bias"])
    emb = p["tok_emb"]["embedding"]
    normed = (emb - emb.mean(-1, keepdims=True)) / emb.std(-1, keepdims=True)
    head = jnp.zeros((JUDGE.emb_dim, JUDGE.vocab_size))
    for src, dst in NEXT.items():
        head = head.at[:, dst].set(normed[src])
    p["out_head"]["kernel"] = head
    return p


def test_instruct_run_scored_by_a_served_judge(tmp_path, shared_data):
    judge_dir = tmp_path / "judge"
    judge_dir.mkdir()
    save_safetensors(bigram_judge(), JUDGE, judge_dir / "model.safetensors")
    transformers.GPT2Config(**hf_config_kwargs(JUDGE)).save_pretrained(judge_dir)
    port = free_port()
    server = start_server(["--hf", str(judge_dir), "--tokenizer", "byte", "--slots", "2",
                           "--model-name", "judge", "--no-warmup"], port)
    try:
        config = tmp_path / "tiny.json"
        config.write_text(json.dumps(dict(vocab_size=257, context_length=512, emb_dim=32,
                                          n_heads=4, n_layers=1, drop_rate=0.0)))
        out = tmp_path / "run"
        argv = ["--init", "random", "--config", str(config),
                "--data", str(shared_data / "instruction-data.json"), "--limit", "40",
                "--steps", "2", "--eval-every", "2", "--max-new-tokens", "6",
                "--set", "batch_size=4", "--set", "sample_count=0", "--set", "pad_multiple=512",
                "--out", str(out), "--quiet", "--judge-url", f"http://127.0.0.1:{port}/v1",
                "--judge-model", "judge", "--judge-timeout", "60"]
        run = subprocess.run([sys.executable, "-m", "jaxllm", "finetune", "instruct", *argv],
                             capture_output=True, text=True, timeout=400,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert run.returncode == 0, run.stderr
    finally:
        stop_server(server)
    judge = json.loads((out / "summary.json").read_text())["judge"]
    responses = json.loads((out / "responses.json").read_text())
    assert judge["scored"] == len(responses) > 0 and judge["failed"] == 0, judge
    assert judge["mean"] == 42
    assert [r["judge_score"] for r in responses] == [42] * len(responses)
