"""Llama 3 and Qwen3 downstream, from folders saved by `transformers`: `generate`
and `chat --hf` with the folder's own tokenizer and chat template (end-of-turn
tokens stop them), LoRA on q, k, v, o, gate, up and down with counts from the
shapes (merged, unmerged, saved alone), a LoRA `finetune instruct` run that resumes, merges and is read back
by transformers, `finetune classify --hf`, and `pretrain --preset llama-3.2-1b`
scaled down by --set. The models are random (2 layers, emb 32) and the
tokenizers are trained here with the `tokenizers` library."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxllm import layout, load_hf, lora
from jaxllm.cli import main
from jaxllm.hf_tokenizer import HFTokenizer
from jaxllm.model import apply
from jaxllm.train import checkpoint
from test_hf_tokenizer import LLAMA_TEMPLATE, QWEN_TEMPLATE, _byte_level_bpe, _save

LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def _saved(folder, family: str, *, stop_first: bool = False):
    """A random `family` model with its tokenizer and chat template in `folder`.
    `stop_first`: weights rigged so that the end-of-turn token is the most
    likely next token everywhere (residual channel 0 held at a constant that
    only that token's head row reads)."""
    if family == "llama":
        tok = _byte_level_bpe(LLAMA_SPECIALS, bos="<|begin_of_text|>")
        eot = tok.token_to_id("<|eot_id|>")
        _save(folder, tok, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                            "chat_template": LLAMA_TEMPLATE})
        config = transformers.LlamaConfig(
            vocab_size=tok.get_vocab_size(), tie_word_embeddings=False, **SHAPE,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16},
            bos_token_id=0, eos_token_id=eot, pad_token_id=None)
        cls = transformers.LlamaForCausalLM
    else:
        tok = _byte_level_bpe(QWEN_SPECIALS)
        eot = tok.token_to_id("<|im_end|>")
        _save(folder, tok, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                            "chat_template": QWEN_TEMPLATE})
        config = transformers.Qwen3Config(
            vocab_size=tok.get_vocab_size(), tie_word_embeddings=True, head_dim=12, **SHAPE,
            bos_token_id=None, eos_token_id=eot, pad_token_id=None)
        cls = transformers.Qwen3ForCausalLM
    torch.manual_seed(0)
    model = cls(config).float().eval()
    if stop_first:
        with torch.no_grad():
            model.model.embed_tokens.weight[:, 0] = 10.0
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight[0] = 0.0
                layer.mlp.down_proj.weight[0] = 0.0
            model.lm_head.weight[eot, 0] = 100.0  # the embedding's row too, when tied
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: (root / family, _saved(root / family, family))
            for family in ("llama", "qwen3")}


def _greedy(model, ids: list[int], n: int, stops) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                         eos_token_id=list(stops), pad_token_id=stops[0])[0, len(ids):].tolist()
    return out[:min([out.index(s) for s in stops if s in out], default=len(out))]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generate_and_chat_on_a_saved_folder_with_its_tokenizer(folders, family, capsys):
    folder, model = folders[family]
    tok = HFTokenizer(folder)
    assert main(["generate", "--hf", str(folder), "--prompt", "Every effort",
                 "--max-new-tokens", "8"]) == 0
    new = _greedy(model, tok.encode_prompt("Every effort"), 8, tok.stop_ids)
    assert capsys.readouterr().out == "Every effort" + tok.decode(new) + "\n"
    assert main(["chat", "--hf", str(folder), "--prompt", "Name three colors.",
                 "--max-new-tokens", "6"]) == 0
    ids = tok.encode_chat([{"role": "user", "content": "Name three colors."}])
    # the chat template's turn, as transformers renders it
    theirs = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(
        [{"role": "user", "content": "Name three colors."}], add_generation_prompt=True,
        tokenize=True, return_dict=False)
    assert ids == theirs
    assert capsys.readouterr().out == tok.decode(_greedy(model, ids, 6, tok.stop_ids)) + "\n"


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_end_of_turn_tokens_stop_generate_and_chat(tmp_path, family, capsys):
    folder = tmp_path / family
    model = _saved(folder, family, stop_first=True)
    tok = HFTokenizer(folder)
    eot = tok.stop_ids[0]
    assert _greedy(model, tok.encode_prompt("Hi"), 3, [-1]) == [eot] * 3  # the rig works
    assert main(["generate", "--hf", str(folder), "--prompt", "Hi"]) == 0
    assert capsys.readouterr().out == "Hi\n"
    assert main(["chat", "--hf", str(folder), "--prompt", "Hi"]) == 0
    assert capsys.readouterr().out == "\n"
    assert main(["generate", "--hf", str(folder), "--prompt", "Hi", "--max-new-tokens", "3",
                 "--ignore-eos"]) == 0
    assert capsys.readouterr().out == "Hi" + tok.decode([eot] * 3) + "\n"


def test_lora_targets_by_name_with_counts_from_the_shapes(folders, tmp_path):
    params, config = load_hf(folders["llama"][0])
    shapes = layout.param_shapes(config)
    names = ("q", "k", "v", "o", "gate", "up", "down")
    adapters = lora.init_lora(params, config, jax.random.key(0), rank=4,
                              targets=",".join(names))
    expected = [f"blocks/{i}/{part}/{n}" for i in range(2) for part, group in
                (("attn", names[:4]), ("ffn", names[4:])) for n in group]
    assert sorted(adapters) == sorted(expected)
    want = sum(4 * sum(shapes[f"{p}/kernel"]) for p in expected)  # r * (in + out) each
    assert lora.count_lora_params(adapters) == want
    assert sorted(lora.init_lora(params, config, jax.random.key(0), rank=4,
                                 targets="attn")) == sorted(p for p in expected if "/attn/" in p)
    with pytest.raises(ValueError, match="match no dense layer"):
        lora.init_lora(params, config, jax.random.key(0), rank=4, targets="qkv")
    # merge, then unmerge, gives back the base; merged logits equal the adapted model's
    adapters = {p: {"a": ab["a"], "b": ab["b"] + 0.1} for p, ab in adapters.items()}
    adapted = lora.with_adapters(params, adapters, alpha=8)
    merged = lora.merge(adapted)
    x = np.array([[5, 6, 7, 8]], np.int32)
    np.testing.assert_allclose(apply(merged, x, config), apply(adapted, x, config), atol=1e-5)
    back = lora.unmerge(merged, adapters, alpha=8)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # an adapter-only file onto the same base gives the same model; onto Qwen3's, refused
    lora.save_adapters(tmp_path / "adapters.safetensors", adapters, 8, config)
    again = lora.load_adapters(tmp_path / "adapters.safetensors", params, config)
    np.testing.assert_allclose(apply(again, x, config), apply(adapted, x, config), atol=1e-6)
    qwen_params, qwen_config = load_hf(folders["qwen3"][0])
    with pytest.raises(ValueError, match="made for another base model"):
        lora.load_adapters(tmp_path / "adapters.safetensors", qwen_params, qwen_config)


def _instructions(path):
    path.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": f"{i}"}
                                for i in range(24)]))
    return path


def test_lora_instruct_on_qwen3_resumes_merges_and_transformers_reads_it(folders, tmp_path,
                                                                         capsys):
    folder, _ = folders["qwen3"]
    run, hf = tmp_path / "run", tmp_path / "merged"
    argv = ["finetune", "instruct", "--hf", str(folder), "--data",
            str(_instructions(tmp_path / "data.json")), "--out", str(run), "--lora-rank", "4",
            "--lora-targets", "q,k,v,o,gate,up,down,head", "--set", "batch_size=4",
            "--set", "lr=1e-2", "--set", "sample_count=0", "--set", "eval_batches=1",
            "--eval-every", "2", "--save-every", "2", "--no-responses", "--quiet"]
    assert main([*argv, "--steps", "2"]) == 0, capsys.readouterr().err
    assert main([*argv, "--steps", "4", "--resume"]) == 0, capsys.readouterr().err
    assert "resuming" in capsys.readouterr().err
    params, config, _ = checkpoint.load_params(run)
    assert config.qk_norm and config.tie_embeddings
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["resumed_from"], summary["last_checkpoint"]) == (2, 4)
    adapters, _ = lora.adapters_of(params)
    assert len(adapters) == 2 * 7 + 1  # every named layer of both blocks, and the tied head
    assert summary["trainable_params"] == lora.count_lora_params(adapters)
    assert any(np.any(np.asarray(ab["b"]) != 0) for ab in adapters.values())  # it trained

    assert main(["lora", "merge", "--run-dir", str(run), "--out", str(hf)]) == 0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf).float().eval()
    assert type(theirs).__name__ == "Qwen3ForCausalLM" and not theirs.config.tie_word_embeddings
    x = np.array([[3, 1, 4, 1, 5, 9, 2, 6]], np.int32)
    with torch.no_grad():
        logits = theirs(torch.tensor(x, dtype=torch.long)).logits.numpy()
    ours = np.asarray(apply(params, x, config))[..., :config.vocab_size]
    np.testing.assert_allclose(logits, ours, atol=1e-4)
    capsys.readouterr()
    assert main(["chat", "--hf", str(hf), "--prompt", "Say 3.", "--max-new-tokens", "2"]) == 0


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_finetune_classify_from_either_folder(folders, family, tmp_path, capsys):
    tsv = tmp_path / "spam.tsv"
    tsv.write_text("".join(f"{'spam' if i % 2 else 'ham'}\t{'win cash' if i % 2 else 'hi'} {i}\n"
                           for i in range(40)))
    out = tmp_path / "run"
    assert main(["finetune", "classify", "--hf", str(folders[family][0]), "--data", str(tsv),
                 "--out", str(out), "--steps", "2", "--set", "batch_size=4", "--eval-batches",
                 "1", "--lora-rank", "2", "--lora-targets", "q,v", "--quiet"]) == 0, \
        capsys.readouterr().err
    params, _, _ = checkpoint.load_params(out)
    assert sorted(lora.adapters_of(params)[0]) == [f"blocks/{i}/attn/{n}" for i in range(2)
                                                   for n in "qv"]


def test_pretrain_a_llama_preset_scaled_down_trains_and_resumes(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["pretrain", "--preset", "llama-3.2-1b", "--set", "n_layers=2", "--set", "emb_dim=64",
            "--set", "n_heads=4", "--set", "n_kv_heads=2", "--set", "head_size=16",
            "--set", "ffn_dim=128", "--set", "context_length=16", "--set", "vocab_size=257",
            "--tokenizer", "byte", "--set", "batch_size=4", "--set", "eval_batches=1",
            "--set", "sample_tokens=2", "--eval-every", "2", "--save-every", "2", "--quiet",
            "--out", str(run)]
    assert main([*argv, "--steps", "2"]) == 0, capsys.readouterr().err
    assert main([*argv, "--steps", "4", "--resume"]) == 0, capsys.readouterr().err
    params, config, _ = checkpoint.load_params(run)
    assert (config.norm, config.mlp, config.positions, config.kv_heads) == \
        ("rmsnorm", "swiglu", "rope", 2)
    assert "gate" in params["blocks"][0]["ffn"]
    losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in losses) == 4


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_the_template_style_tokenizes_as_transformers_renders_the_conversation(folders, family):
    """An entry in the model's chat template: the prompt is transformers' user turn with
    the generation prompt, the answer the assistant turn's ids up to its end of turn."""
    from jaxllm.data.instructions import tokenize_entries
    from jaxllm.data.preferences import tokenize_pairs

    folder, _ = folders[family]
    tok, theirs = HFTokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    entry = {"instruction": "Name a color.", "input": "One word.", "output": "Blue.",
             "chosen": "Blue.", "rejected": "I cannot."}
    user = [{"role": "user", "content": "Name a color.\n\nOne word."}]
    prompt = theirs.apply_chat_template(user, add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    whole = theirs.apply_chat_template([*user, {"role": "assistant", "content": "Blue."}],
                                       tokenize=True, return_dict=False)
    end = next(i for i in range(len(prompt), len(whole)) if whole[i] in tok.stop_ids)
    (example,) = tokenize_entries([entry], tok, "template")
    assert example.prompt_length == len(prompt)
    assert example.tokens.tolist() == whole[:end]
    (pair,) = tokenize_pairs([entry], tok, "template")
    assert pair.chosen.tolist() == [*whole[:end], tok.eot_id] and pair.prefix == len(prompt)
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        from jaxllm.tokenizer import ByteTokenizer

        tokenize_entries([entry], ByteTokenizer(), "template")


def test_dpo_in_the_chat_template_and_chat_reads_the_style(folders, tmp_path, capsys):
    from jaxllm.finetune.instruct_run import prompt_style_of

    folder, _ = folders["qwen3"]
    data = tmp_path / "prefs.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "chosen": f"{i}",
                                 "rejected": f"{i + 1}"} for i in range(24)]))
    run = tmp_path / "run"
    assert main(["finetune", "dpo", "--hf", str(folder), "--data", str(data), "--style",
                 "template", "--steps", "2", "--set", "batch_size=4", "--set", "sample_count=1",
                 "--set", "eval_batches=1", "--max-new-tokens", "3", "--out", str(run),
                 "--quiet"]) == 0, capsys.readouterr().err
    assert prompt_style_of(run) == "template"
    responses = json.loads((run / "responses.json").read_text())
    assert len(responses) == 2 and all("<|im_end|>" not in r["model_response"] for r in responses)
    assert main(["chat", "--run-dir", str(run), "--prompt", "Say 3.", "--max-new-tokens", "2"]) == 0
