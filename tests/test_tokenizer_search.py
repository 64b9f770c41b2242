"""Where every command finds its tokenizer: the flag, the run's or model
folder's own files, $JAXLLM_GPT2_DIR, shared/data above the checkout; what a
run records; a Hugging Face folder's tokenizer and chat template in
`generate --hf` and `chat --hf`."""

import json
import shutil

import jax
import numpy as np
import pytest

import jaxllm
from jaxllm import tokenizer as tokmod
from jaxllm.cli import main
from jaxllm.hf import hf_config_kwargs, save_safetensors
from jaxllm.tokenizer import EXPORT_KEY, get_tokenizer


def _vocab(folder, source, names=("gpt2.tiktoken",)):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(source / name, folder / name)
    return folder


@pytest.fixture
def nowhere_else(monkeypatch):
    """No $JAXLLM_GPT2_DIR, no shared/data, no download: only what a test gives."""
    import tiktoken

    monkeypatch.delenv("JAXLLM_GPT2_DIR", raising=False)
    monkeypatch.setattr(tokmod, "shared_data_folders", lambda: [])

    def offline(name):
        raise ConnectionError("offline")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)


def test_search_order(shared_data, tmp_path, monkeypatch):
    flag, place, env = (_vocab(tmp_path / n, shared_data) for n in ("flag", "place", "env"))
    monkeypatch.setenv("JAXLLM_GPT2_DIR", str(env))
    places = [(tmp_path / "gone", "recorded by a run"), (place, "--hf place")]
    assert get_tokenizer("gpt2", flag, places=places).directory == str(flag)
    assert get_tokenizer("gpt2", places=places).directory == str(place)
    assert get_tokenizer("gpt2", places=places[:1]).directory == str(env)
    monkeypatch.delenv("JAXLLM_GPT2_DIR")
    if not any(folder.is_dir() for folder in tokmod.shared_data_folders()):
        # a clone with no shared/data above it (git clone . /tmp/x): found from the current directory
        monkeypatch.chdir(shared_data.resolve().parents[1])
    found = get_tokenizer("gpt2", places=places[:1])  # shared/data above the checkout
    assert found.directory == str(shared_data.resolve())
    assert shared_data.resolve() in [d.resolve() for d in tokmod.shared_data_folders()]
    assert found.encode("Hello, world") == [15496, 11, 995]
    with pytest.raises(FileNotFoundError, match="empty"):  # a flag is that folder or an error
        get_tokenizer("gpt2", tmp_path / "empty", places=places)


def test_nothing_found_lists_every_place_tried(tmp_path, nowhere_else, monkeypatch):
    monkeypatch.setattr(tokmod, "shared_data_folders", lambda: [tmp_path / "shared" / "data"])
    monkeypatch.setenv("JAXLLM_GPT2_DIR", str(tmp_path / "env"))
    with pytest.raises(FileNotFoundError) as err:
        get_tokenizer("gpt2", places=[(tmp_path / "run_vocab", "recorded by the run r")])
    message = str(err.value)
    for tried in (f"{tmp_path / 'run_vocab'} (recorded by the run r)",
                  f"{tmp_path / 'env'} ($JAXLLM_GPT2_DIR)",
                  f"{tmp_path / 'shared' / 'data'} (shared/data above the checkout)",
                  "could not be downloaded (ConnectionError)", "--tokenizer-dir DIR"):
        assert tried in message, (tried, message)
    with pytest.raises(FileNotFoundError, match=r"no tokenizer.json found: tried .*\(--hf x\)"):
        get_tokenizer("hf", places=[(tmp_path, "--hf x")])


def test_a_hugging_face_gpt2_folder_is_read_as_the_tokenizers_library_reads_it(
        shared_data, tmp_path, nowhere_else):
    from tokenizers import ByteLevelBPETokenizer

    hf = tmp_path / "gpt2"
    hf.mkdir()  # a Hugging Face folder names GPT-2's two data-gym files vocab.json, merges.txt
    shutil.copy(shared_data / "encoder.json", hf / "vocab.json")
    shutil.copy(shared_data / "vocab.bpe", hf / "merges.txt")
    ours = get_tokenizer(None, places=[(hf, "--hf gpt2")], vocab_size=50257)
    theirs = ByteLevelBPETokenizer(str(hf / "vocab.json"), str(hf / "merges.txt"))
    text = (shared_data / "the-verdict.txt").read_text(encoding="utf-8")[:2000] + " 東京 🚀"
    assert ours.name == "gpt2" and ours.directory == str(hf)
    assert ours.encode(text) == theirs.encode(text).ids


def test_the_tokenizer_a_folder_holds(shared_data, tmp_path, nowhere_else):
    folder = tmp_path / "m"
    folder.mkdir()
    config = {"vocab_size": 257}
    (folder / "config.json").write_text(json.dumps(config))
    assert get_tokenizer(None, places=[(folder, "--hf m")], vocab_size=257).name == "byte"
    _vocab(folder, shared_data)  # GPT-2's files beside it name GPT-2
    assert get_tokenizer(None, places=[(folder, "--hf m")], vocab_size=257).name == "gpt2"
    # an export says what it was trained with, and where GPT-2's files were
    (folder / "gpt2.tiktoken").unlink()
    config[EXPORT_KEY] = {"name": "gpt2", "directory": str(shared_data)}
    (folder / "config.json").write_text(json.dumps(config))
    tok = get_tokenizer(None, places=[(folder, "--hf m")], vocab_size=50257)
    assert tok.name == "gpt2" and tok.directory == str(shared_data.resolve())
    config[EXPORT_KEY] = {"name": "byte", "directory": None}
    (folder / "config.json").write_text(json.dumps(config))
    assert get_tokenizer(None, places=[(folder, "--hf m")], vocab_size=50257).name == "byte"


# -- the commands ----------------------------------------------------------------------------

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
            "<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
            "{% endif %}")


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory):
    """A tiny GPT-2 in Hugging Face format with a Llama-3-style tokenizer.json,
    chat template and end-of-turn ids beside it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    d = tmp_path_factory.mktemp("chat_model")
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["Every effort moves you.", "Name three colors: red, green, blue."],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel
                                                .alphabet()))
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "chat_template": TEMPLATE}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 4]}))
    config = jaxllm.GPTConfig(vocab_size=tok.get_vocab_size(), context_length=64, emb_dim=32,
                              n_heads=4, n_layers=1, drop_rate=0.0, qkv_bias=True)
    save_safetensors(jaxllm.init_params(config, jax.random.PRNGKey(0)), config,
                     d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(dict(hf_config_kwargs(config), model_type="gpt2")))
    return d


@pytest.fixture
def scripted(monkeypatch):
    """generate_stream replaced by a script of tokens; the prompts it was given."""
    import sys

    prompts, script = [], [[7, 8], [4], [9]]  # 4: <|eot_id|>, a stop the decoder was not given

    def stream(params, config, prompt, max_new_tokens, *, eos_id=None, **kwargs):
        prompts.append((list(prompt), eos_id))
        for tokens in script:
            yield np.array([tokens]), None

    monkeypatch.setattr(sys.modules["jaxllm.generate"], "generate_stream", stream)
    return prompts


def test_chat_hf_uses_the_folder_template_and_stops_at_end_of_turn(chat_folder, scripted,
                                                                    capsys):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(chat_folder)
    assert main(["chat", "--hf", str(chat_folder), "--prompt", "Name a color."]) == 0
    (prompt, eos_id), = scripted
    expected = theirs.apply_chat_template([{"role": "user", "content": "Name a color."}],
                                          add_generation_prompt=True, tokenize=True,
                                          return_dict=False)
    assert prompt == expected and eos_id == 1
    assert capsys.readouterr().out == theirs.decode([7, 8]) + "\n"  # not 9, after the stop
    assert main(["chat", "--hf", str(chat_folder), "--prompt", "x", "--style", "alpaca"]) == 0
    assert scripted[-1][0] == theirs.encode(
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nx\n\n### Response:\n",
        add_special_tokens=False, split_special_tokens=True)


def test_generate_hf_uses_the_folder_tokenizer(chat_folder, scripted, capsys):
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(chat_folder)
    assert main(["generate", "--hf", str(chat_folder), "--prompt", "Every effort"]) == 0
    assert scripted[0][0] == theirs.encode("Every effort")  # with <|begin_of_text|>
    assert capsys.readouterr().out == "Every effort" + theirs.decode([7, 8]) + "\n"
    assert main(["generate", "--hf", str(chat_folder), "--prompt", "Every effort",
                 "--ignore-eos"]) == 0
    assert scripted[1][1] is None
    assert capsys.readouterr().out == "Every effort" + theirs.decode([7, 8, 4, 9]) + "\n"


def test_a_run_finds_its_vocabulary_where_it_was_found(shared_data, tmp_path, nowhere_else,
                                                        capsys):
    """finetune classify --hf on a folder with its own vocab.json + merges.txt,
    then classify --run-dir and finetune --run-dir with no flag and nothing else
    to search."""
    config = jaxllm.GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_heads=2,
                              n_layers=1, drop_rate=0.0, qkv_bias=True)
    hf = tmp_path / "gpt2"
    hf.mkdir()
    save_safetensors(jaxllm.init_params(config, jax.random.PRNGKey(0)), config,
                     hf / "model.safetensors")
    (hf / "config.json").write_text(json.dumps(dict(hf_config_kwargs(config),
                                                    model_type="gpt2")))
    shutil.copy(shared_data / "encoder.json", hf / "vocab.json")
    shutil.copy(shared_data / "vocab.bpe", hf / "merges.txt")
    data = tmp_path / "spam.tsv"
    data.write_text("".join(f"{'spam' if i % 2 else 'ham'}\tmessage number {i}\n"
                            for i in range(40)))
    out = tmp_path / "run"
    assert main(["finetune", "classify", "--hf", str(hf), "--data", str(data), "--steps", "1",
                 "--out", str(out), "--quiet", "--eval-batches", "1"]) == 0
    meta = json.loads((out / "config.json").read_text())
    assert meta["tokenizer"] == "gpt2" and meta["tokenizer_dir"] == str(hf)
    capsys.readouterr()
    assert main(["classify", "--run-dir", str(out), "--text", "message number 3"]) == 0
    assert capsys.readouterr().out.split("\t")[0] in ("ham", "spam")
    shutil.rmtree(hf)  # moved away: the message names the run's record among the places
    assert main(["classify", "--run-dir", str(out), "--text", "x"]) == 2
    assert f"{hf} (recorded by the run {out})" in capsys.readouterr().err


def test_a_run_with_a_family_tokenizer_keeps_it(chat_folder, scripted, tmp_path, nowhere_else,
                                                capsys):
    """A run trained with a folder's tokenizer.json finds it again for generate
    and chat --run-dir (the chat template too), with no flag."""
    from transformers import AutoTokenizer

    from jaxllm.hf import from_hf_state_dict
    from jaxllm.train import TrainConfig, checkpoint, init_train_state

    theirs = AutoTokenizer.from_pretrained(chat_folder)
    config = jaxllm.GPTConfig(vocab_size=len(theirs), context_length=64, emb_dim=32, n_heads=4,
                              n_layers=1, drop_rate=0.0, qkv_bias=True)
    params = from_hf_state_dict(chat_folder / "model.safetensors", config)
    run = tmp_path / "run"
    checkpoint.save(checkpoint.open_manager(run, create=True),
                    init_train_state(params, TrainConfig()),
                    {"model": config.to_dict(), "tokenizer": "hf", "kind": "pretrain",
                     "tokenizer_dir": str(chat_folder)})
    assert main(["generate", "--run-dir", str(run), "--prompt", "Every effort"]) == 0
    assert scripted[-1][0] == theirs.encode("Every effort")
    assert main(["chat", "--run-dir", str(run), "--prompt", "Hi"]) == 0
    assert scripted[-1][0] == theirs.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True,
        return_dict=False)
    capsys.readouterr()
    assert main(["chat", "--run-dir", str(run), "--prompt", "Hi", "--tokenizer", "gpt2"]) == 2
    assert "trained with the hf tokenizer, not --tokenizer gpt2" in capsys.readouterr().err
