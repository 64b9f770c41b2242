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


def _cut(source, target, lines=None, chars=None):
    """`source` copied to `target`, cut to its first lines or characters."""
    text = source.read_bytes()
    if lines is not None:
        text = b"\n".join(text.splitlines()[:lines]) + b"\n"
    target.write_bytes(text[:chars] if chars is not None else text)


# Each damage, and the one sentence that names the file at fault (never a good one).
DAMAGES = {
    "truncated gpt2.tiktoken": (
        {"gpt2.tiktoken": 1000},
        "gpt2.tiktoken holds 1,000 tokens where GPT-2 has 50,256; replace the file"),
    "gpt2.tiktoken cut mid-line": (
        {"gpt2.tiktoken": -8},  # the last line's rank and a character lost
        "gpt2.tiktoken has a line that is not a base64 token and its rank ("),
    "truncated vocab.bpe": (
        {"vocab.bpe": 1000, "encoder.json": None},
        "vocab.bpe holds 999 merges where GPT-2 has 50,000; replace the file"),
    "truncated encoder.json": (
        {"vocab.bpe": None, "encoder.json": -5},
        "encoder.json is not valid JSON ("),
    "encoder.json of another vocabulary": (
        {"vocab.bpe": None, "encoder.json": "swapped"},
        "vocab.bpe and encoder.json do not agree ("),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_vocabulary_names_the_folder_and_the_file_at_fault(shared_data, tmp_path,
                                                                      damage):
    import json

    files, message = DAMAGES[damage]
    for name, cut in files.items():
        if cut is None:
            shutil.copy(shared_data / name, tmp_path / name)
        elif cut == "swapped":  # valid alone, but two ids exchanged
            encoder = json.loads((shared_data / name).read_text(encoding="utf-8"))
            encoder["a"], encoder["b"] = encoder["b"], encoder["a"]
            (tmp_path / name).write_text(json.dumps(encoder), encoding="utf-8")
        elif cut < 0:  # the last few characters lost
            _cut(shared_data / name, tmp_path / name,
                 chars=(shared_data / name).stat().st_size + cut)
        else:
            _cut(shared_data / name, tmp_path / name, lines=cut)
    with pytest.raises(ValueError) as err:
        GPT2Tokenizer(tmp_path)
    text = str(err.value)
    assert text.startswith(f"the GPT-2 vocabulary in {tmp_path} is damaged: {message}")
    assert "\n" not in text and " do not agree" not in text.replace(message, "")
    innocent = [n for n in files if n not in message]
    assert not any(n in text for n in innocent), text


def test_a_replaced_vocabulary_file_is_read_afresh(shared_data, tmp_path):
    """tiktoken's loaders cache what they read by path: a damaged file put
    right must not go on being read as damaged."""
    _cut(shared_data / "gpt2.tiktoken", tmp_path / "gpt2.tiktoken", lines=1000)
    with pytest.raises(ValueError, match="gpt2.tiktoken holds 1,000 tokens"):
        GPT2Tokenizer(tmp_path)
    shutil.copy(shared_data / "gpt2.tiktoken", tmp_path / "gpt2.tiktoken")
    assert GPT2Tokenizer(tmp_path).encode("Hello, world") == [15496, 11, 995]


def test_both_vocabulary_formats_give_the_same_tokens(gpt2, shared_data, tmp_path):
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(shared_data / name, tmp_path / name)
    data_gym = GPT2Tokenizer(tmp_path)
    for text in TEXTS + [(shared_data / "the-verdict.txt").read_text(encoding="utf-8")]:
        assert data_gym.encode(text) == gpt2.encode(text)


def test_vocabulary_files_that_would_crash_tiktoken_are_named(shared_data, tmp_path):
    import json

    folder = tmp_path / "folder"
    (folder / "gpt2.tiktoken").mkdir(parents=True)  # a folder where the file should be
    with pytest.raises(ValueError, match=r"damaged: gpt2.tiktoken is not a file"):
        GPT2Tokenizer(folder)
    dup = tmp_path / "dup"
    dup.mkdir()
    lines = (shared_data / "gpt2.tiktoken").read_bytes().splitlines()
    lines[199] = lines[199].split()[0] + b" 5"  # rank 5 twice, rank 199 never
    (dup / "gpt2.tiktoken").write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(ValueError, match=r"gpt2.tiktoken does not number its tokens 0 to "
                                         r"50255, each once"):
        GPT2Tokenizer(dup)
    no_eot = tmp_path / "no_eot"
    no_eot.mkdir()
    shutil.copy(shared_data / "vocab.bpe", no_eot / "vocab.bpe")
    encoder = json.loads((shared_data / "encoder.json").read_text(encoding="utf-8"))
    encoder["<|extra|>"] = encoder.pop("<|endoftext|>")
    (no_eot / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    with pytest.raises(ValueError, match=r"encoder.json does not give <\|endoftext\|> the id "
                                         r"50256"):
        GPT2Tokenizer(no_eot)
