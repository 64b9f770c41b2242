"""Tokenizers: GPT-2 ids against the published the-verdict figures, round trips, errors."""

import shutil

import pytest

from jaxllm.tokenizer import ByteTokenizer, GPT2Tokenizer, get_tokenizer

TEXTS = ["Hello, world", "", "naïve café — 東京 🚀 <tab>\t\nend", "  spaces  and\n\nnewlines "]


@pytest.fixture(scope="module")
def gpt2(shared_data):
    return GPT2Tokenizer(shared_data)


def test_the_verdict_token_count(gpt2, shared_data):
    text = (shared_data / "the-verdict.txt").read_text(encoding="utf-8")
    ids = gpt2.encode(text)
    assert len(ids) == 5145
    assert ids[:10] == [40, 367, 2885, 1464, 1807, 3619, 402, 271, 10899, 2138]


def test_hello_world(gpt2):
    assert gpt2.encode("Hello, world") == [15496, 11, 995]
    assert gpt2.decode([15496, 11, 995]) == "Hello, world"


@pytest.mark.parametrize("text", TEXTS)
def test_round_trips(gpt2, text):
    assert gpt2.decode(gpt2.encode(text)) == text
    byte = ByteTokenizer()
    assert byte.decode(byte.encode(text)) == text
    assert byte.encode(text) == list(text.encode("utf-8"))


def test_end_of_text_marker(gpt2):
    text = "one<|endoftext|>two"
    assert gpt2.eot_id in gpt2.encode(text, allow_eot=True)
    assert gpt2.eot_id not in gpt2.encode(text)  # ordinary text: the marker is spelled out
    byte = ByteTokenizer()
    ids = byte.encode(text, allow_eot=True)
    assert ids.count(256) == 1 and byte.decode(ids) == text


def test_data_gym_files_match_tiktoken_file(gpt2, shared_data, tmp_path):
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(shared_data / name, tmp_path / name)
    other = GPT2Tokenizer(tmp_path)
    text = (shared_data / "the-verdict.txt").read_text(encoding="utf-8")[:3000] + " 東京 🚀"
    assert other.encode(text) == gpt2.encode(text)


def test_directory_from_environment(shared_data, monkeypatch):
    monkeypatch.setenv("JAXLLM_GPT2_DIR", str(shared_data))
    assert get_tokenizer("gpt2").encode("Hello, world") == [15496, 11, 995]


def test_missing_directory_and_files(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        GPT2Tokenizer(missing)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "gpt2.tiktoken")):
        GPT2Tokenizer(tmp_path)


def test_bad_ids_and_names():
    with pytest.raises(ValueError, match="257"):
        ByteTokenizer().decode([300])
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe'"):
        get_tokenizer("bpe")


@pytest.mark.parametrize("damage", ["truncated vocab.bpe", "truncated gpt2.tiktoken"])
def test_a_damaged_vocabulary_names_the_folder_and_files(shared_data, tmp_path, damage):
    if damage == "truncated vocab.bpe":
        shutil.copy(shared_data / "encoder.json", tmp_path / "encoder.json")
        lines = (shared_data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
        (tmp_path / "vocab.bpe").write_text("\n".join(lines[:1000]) + "\n", encoding="utf-8")
        names = "vocab.bpe, encoder.json"
    else:
        lines = (shared_data / "gpt2.tiktoken").read_bytes().splitlines()
        (tmp_path / "gpt2.tiktoken").write_bytes(b"\n".join(lines[:1000]) + b"\n")
        names = "gpt2.tiktoken"
    with pytest.raises(ValueError, match=f"GPT-2 vocabulary in {tmp_path} is damaged.*{names}"):
        GPT2Tokenizer(tmp_path)
