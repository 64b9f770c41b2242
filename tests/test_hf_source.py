"""One `--hf` loader for every command (`jaxllm.cli.hf_source`): generate,
chat, finetune classify and finetune instruct read the same tiny GPT-2 folder
written by `transformers`, as safetensors and as pytorch_model.bin, and a hub
name with the hub unreachable is one clear line in each."""

import json

import huggingface_hub
import numpy as np
import pytest
import torch
import transformers

from jaxllm import from_hf_state_dict, load_hf
from jaxllm.cli import hf_source, main

HF = transformers.GPT2Config(vocab_size=257, n_positions=256, n_embd=32, n_layer=2, n_head=4,
                             bos_token_id=256, eos_token_id=256)
OFFLINE = "is not in the local Hugging Face cache and the hub cannot be reached"


@pytest.fixture(scope="module")
def gpt2_folders(tmp_path_factory):
    """A random GPT2LMHeadModel saved by transformers, safetensors and .bin."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(HF).eval()
    safe, pickled = (tmp_path_factory.mktemp(name) for name in ("safe", "bin"))
    model.save_pretrained(safe)
    HF.save_pretrained(pickled)  # transformers 5 writes only safetensors: the .bin by torch
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    assert (safe / "model.safetensors").exists() and (pickled / "pytorch_model.bin").exists()
    return model, safe, pickled


def test_both_weight_files_load_the_same_model(gpt2_folders):
    model, safe, pickled = gpt2_folders
    expected = from_hf_state_dict(model.state_dict(), load_hf(str(safe))[1])
    for where in (safe, pickled, safe / "model.safetensors", pickled / "pytorch_model.bin"):
        loaded = hf_source.load(str(where))
        assert loaded.config.n_heads == 4 and loaded.config.context_length == 256
        assert all(np.array_equal(a, b) for a, b in zip(
            jax_leaves(loaded.params), jax_leaves(expected)))


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def transformers_greedy(model, text: str, n: int) -> str:
    """`n` greedy bytes after `text` by transformers, cut at end-of-text (256)."""
    ids = list(text.encode())
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                         pad_token_id=256)[0, len(ids):].tolist()
    new = out[:out.index(256)] if 256 in out else out
    return bytes(new).decode("utf-8", "replace")


def test_generate_and_chat_take_a_folder_of_either_kind(gpt2_folders, capsys):
    from jaxllm.finetune.instruct import format_prompt

    model, safe, pickled = gpt2_folders
    question = format_prompt({"instruction": "Hi", "input": ""}, "alpaca")
    for where in (safe, pickled):
        assert main(["generate", "--hf", str(where), "--tokenizer", "byte", "--prompt", "Hi",
                     "--max-new-tokens", "6"]) == 0
        assert capsys.readouterr().out == "Hi" + transformers_greedy(model, "Hi", 6) + "\n"
        assert main(["chat", "--hf", str(where), "--tokenizer", "byte", "--prompt", "Hi",
                     "--max-new-tokens", "4"]) == 0
        assert capsys.readouterr().out == transformers_greedy(model, question, 4) + "\n"


def test_both_finetune_commands_take_a_folder(gpt2_folders, tmp_path, capsys):
    _, safe, pickled = gpt2_folders
    tsv = tmp_path / "spam.tsv"
    tsv.write_text("".join(f"{'spam' if i % 2 else 'ham'}\t{'win cash' if i % 2 else 'hi'} {i}\n"
                           for i in range(40)))
    instructions = tmp_path / "data.json"
    instructions.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "",
                                         "output": str(i)} for i in range(24)]))
    common = ["--tokenizer", "byte", "--steps", "1", "--set", "batch_size=4", "--quiet"]
    # one folder kind each (both kinds load alike: test_both_weight_files_load_the_same_model)
    for task, data, where, extra in (("classify", tsv, safe, ["--eval-batches", "1"]),
                                     ("instruct", instructions, pickled,
                                      ["--no-responses", "--set", "sample_count=0",
                                       "--set", "eval_batches=1"])):
        out = tmp_path / task
        assert main(["finetune", task, "--hf", str(where), "--data", str(data),
                     "--out", str(out), *common, *extra]) == 0, capsys.readouterr().err
        assert json.loads((out / "summary.json").read_text())["source"] == f"hf:{where}"
    capsys.readouterr()


def test_a_hub_name_offline_is_one_clear_line_in_every_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # nothing cached
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-home"))
    data = tmp_path / "x.tsv"
    data.write_text("ham\thi\n")
    for argv in (["generate", "--hf", "gpt2"], ["chat", "--hf", "gpt2", "--prompt", "hi"],
                 ["finetune", "classify", "--hf", "gpt2", "--data", str(data),
                  "--out", str(tmp_path / "c")],
                 ["finetune", "instruct", "--hf", "gpt2", "--data", str(data),
                  "--out", str(tmp_path / "i")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"--hf gpt2: no such folder; as a hub model name it {OFFLINE} " \
               f"(HF_HUB_OFFLINE is set)" in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    # not a path and not a hub name: said without asking the hub
    assert main(["generate", "--hf", "./no/such/dir"]) == 2
    assert "--hf ./no/such/dir: no such file or directory" in capsys.readouterr().err
