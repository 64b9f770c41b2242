"""`jaxllm generate` on a tiny model saved in Hugging Face format, byte tokenizer."""

import sys

import jax
import numpy as np
import pytest
import transformers

import jaxllm
from jaxllm.cli import main
from jaxllm.generate import generate
from jaxllm.hf import hf_config_kwargs, save_safetensors
from jaxllm.tokenizer import ByteTokenizer

# GPT-2's layout: biased qkv projection, head tied to the token embedding
CFG = jaxllm.GPTConfig(vocab_size=257, context_length=32, emb_dim=32, n_heads=4, n_layers=2,
                       drop_rate=0.0, qkv_bias=True, tie_embeddings=True)
PROMPT = "Hi"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """model.safetensors + config.json, as `save_pretrained` writes them."""
    d = tmp_path_factory.mktemp("tiny_gpt2")
    params = jaxllm.init_params(CFG, jax.random.PRNGKey(0))
    # give the qkv biases values, so that loading them is tested
    for blk in params["blocks"]:
        blk["attn"]["qkv"]["bias"] = 0.1 * jax.random.normal(jax.random.PRNGKey(1), (96,))
    save_safetensors(params, CFG, d / "model.safetensors")
    transformers.GPT2Config(**hf_config_kwargs(CFG)).save_pretrained(d)
    return d, params


def expected_text(params, max_new_tokens, **kwargs):
    tok = ByteTokenizer()
    out = generate(params, CFG, tok.encode(PROMPT), max_new_tokens, eos_id=tok.eot_id, **kwargs)
    new = out.tokens[0, : out.lengths[0]].tolist()
    if new and new[-1] == tok.eot_id:
        new = new[:-1]
    return PROMPT + tok.decode(new) + "\n"


def test_streams_the_same_text_as_generate(model_dir, capsys):
    d, params = model_dir
    rc = main(["generate", "--hf", str(d), "--prompt", PROMPT, "--max-new-tokens", "20",
               "--tokenizer", "byte"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed == expected_text(params, 20, chunk_size=1)
    assert len(printed) > len(PROMPT) + 1


def test_cpu_recipe_streams_what_generate_gives_on_its_kernels(model_dir, capsys):
    """`--cpu-recipe`: MKL's products and the row-wise LayerNorm on this Intel
    CPU, and the text `generate` gives on the same kernels."""
    from jaxllm.cli.generate import inference_recipe

    d, params = model_dir
    config = inference_recipe(CFG)
    assert (config.matmul_impl, config.norm_impl) != (CFG.matmul_impl, CFG.norm_impl)
    assert main(["generate", "--hf", str(d), "--prompt", PROMPT, "--max-new-tokens", "12",
                 "--tokenizer", "byte", "--cpu-recipe"]) == 0
    tok = ByteTokenizer()
    out = generate(params, config, tok.encode(PROMPT), 12, eos_id=tok.eot_id, chunk_size=1)
    new = [t for t in out.tokens[0, : out.lengths[0]].tolist() if t != tok.eot_id]
    assert capsys.readouterr().out == PROMPT + tok.decode(new) + "\n"


def test_sampling_options_and_a_weights_file(model_dir, capsys, tmp_path):
    d, params = model_dir
    # the weights file names its folder; without config.json beside it, one line says so
    bare = tmp_path / "model.safetensors"
    bare.write_bytes((d / "model.safetensors").read_bytes())
    assert main(["generate", "--hf", str(bare), "--tokenizer", "byte"]) == 2
    assert "no config.json beside the weights" in capsys.readouterr().err
    rc = main(["generate", "--hf", str(d / "model.safetensors"), "--prompt", PROMPT,
               "--max-new-tokens", "12", "--tokenizer", "byte", "--temperature", "0.8",
               "--top-k", "50", "--top-p", "0.9", "--seed", "3"])
    assert rc == 0
    assert capsys.readouterr().out == expected_text(
        params, 12, rng=jax.random.PRNGKey(3), temperature=0.8, top_k=50, top_p=0.9,
        chunk_size=1)


def test_incomplete_utf8_waits_for_the_rest(model_dir, capsys, monkeypatch):
    """A two-byte character produced over two steps prints only when complete."""
    import jaxllm.cli.generate as cli

    euro = "é".encode("utf-8")
    chunks = [(np.array([[euro[0]]]), None), (np.array([[euro[1]]]), None),
              (np.array([[ord("!")]]), None)]
    written = []

    class Recorder:
        def write(self, s):
            written.append(s)

        def flush(self):
            pass

    # (the module, not the function `jaxllm.generate` that shadows its name)
    monkeypatch.setattr(sys.modules["jaxllm.generate"], "generate_stream",
                        lambda *a, **k: iter(chunks))
    monkeypatch.setattr(cli.sys, "stdout", Recorder())
    d, _ = model_dir
    assert main(["generate", "--hf", str(d), "--prompt", PROMPT, "--tokenizer", "byte"]) == 0
    assert written == [PROMPT, "", "é", "!", "\n"]


def test_bad_arguments_are_reported(model_dir, capsys, tmp_path):
    d, _ = model_dir
    assert main(["generate", "--hf", str(tmp_path / "nope"), "--tokenizer", "byte"]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["generate", "--hf", str(d), "--tokenizer", "byte", "--top-p", "1.5",
                 "--temperature", "1"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err


def test_generate_leaves_malloc_alone(model_dir, capsys, monkeypatch):
    """`reuse_host_memory` is a process-wide change for training; generation never asks
    for it."""
    import jaxllm.host_memory as host_memory

    calls = []
    monkeypatch.setattr(host_memory, "reuse_host_memory", lambda *a, **k: calls.append(a))
    d, _ = model_dir
    assert main(["generate", "--hf", str(d), "--prompt", PROMPT, "--max-new-tokens", "3",
                 "--tokenizer", "byte", "--no-stream"]) == 0
    capsys.readouterr()
    assert calls == []


def test_a_run_dir_generates_unless_it_is_a_classifier(model_dir, tmp_path, capsys):
    """A run keeps its LM head and generates; a classifier's head scores classes,
    so it is refused in one line that points to `jaxllm classify`."""
    from jaxllm.train import TrainConfig, checkpoint, init_train_state

    _, params = model_dir
    for name, kind in (("lm", "pretrain"), ("clf", "classify")):
        checkpoint.save(checkpoint.open_manager(tmp_path / name, create=True),
                        init_train_state(params, TrainConfig()),
                        {"model": CFG.to_dict(), "tokenizer": "byte", "kind": kind})
    argv = ["generate", "--prompt", PROMPT, "--max-new-tokens", "8"]
    assert main([*argv, "--run-dir", str(tmp_path / "lm")]) == 0
    assert capsys.readouterr().out == expected_text(params, 8, chunk_size=1)
    clf = tmp_path / "clf"
    assert main([*argv, "--run-dir", str(clf)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and "\n" not in err
    assert f"{clf} is a classifier" in err and f"jaxllm classify --run-dir {clf}" in err


def test_a_run_dir_refuses_another_tokenizer_than_its_own(model_dir, tmp_path, capsys,
                                                          shared_data):
    """A byte-level run given `--tokenizer gpt2` is refused naming both tokenizers
    (its ids would be other text to the model), not at the first prompt id past
    its vocabulary; the run's own name is accepted. Weights without a record
    (--hf) whose vocabulary cannot hold the tokenizer's ids are told exactly that."""
    from jaxllm.train import TrainConfig, checkpoint, init_train_state

    d, params = model_dir
    run = tmp_path / "lm"
    checkpoint.save(checkpoint.open_manager(run, create=True),
                    init_train_state(params, TrainConfig()),
                    {"model": CFG.to_dict(), "tokenizer": "byte", "kind": "pretrain"})
    argv = ["generate", "--prompt", "The", "--max-new-tokens", "2",
            "--tokenizer-dir", str(shared_data)]
    cases = [
        (["--run-dir", str(run), "--tokenizer", "gpt2"],
         f"{run} was trained with the byte tokenizer, not --tokenizer gpt2; drop the flag to "
         f"generate with the run's own"),
        (["--hf", str(d)],  # gpt2, the default for --hf
         "the model's vocabulary (257 ids) cannot hold the gpt2 tokenizer's ids (0 to 50256)"),
    ]
    for extra, message in cases:
        assert main([*argv, *extra]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.count("\n") == 1
        assert captured.err.startswith(f"jaxllm generate: error: {message}")
    assert main([*argv, "--run-dir", str(run), "--tokenizer", "byte"]) == 0
    assert capsys.readouterr().out.startswith("The")
