"""Corpus reading, sliding windows, splits, batch order, token files."""

import json

import numpy as np
import pytest

from jaxllm.data import (
    RandomWindowBatches,
    SlidingWindows,
    TokenFile,
    WindowBatches,
    default_corpus_documents,
    read_documents,
    read_text_file,
    split_tokens,
    tokenize_documents,
    write_token_file,
)
from jaxllm.data.token_file import CHUNK_CHARS
from jaxllm.tokenizer import ByteTokenizer, GPT2Tokenizer


def test_default_corpus_is_sizeable_english_and_deterministic():
    docs = default_corpus_documents()
    assert len(docs) > 50
    assert docs == default_corpus_documents()
    ids = tokenize_documents(docs, ByteTokenizer())
    assert ids.dtype == np.int32
    assert 300_000 < len(ids) < 2_000_000  # about half a megabyte of help text
    assert (ids == 256).sum() == len(docs) - 1  # end-of-text between documents
    assert "statement" in ByteTokenizer().decode(ids[:2000])


def test_folder_reads_sorted_txt_files(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "c.md").write_text("ignored")
    assert read_documents(tmp_path) == ["first", "second"]
    ids = tokenize_documents(read_documents(tmp_path), ByteTokenizer())
    assert ByteTokenizer().decode(ids) == "first<|endoftext|>second"


def test_invalid_utf8_names_file_and_offset(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello \xff world")
    with pytest.raises(ValueError, match=r"bad\.txt.*byte offset 6"):
        read_text_file(bad)
    assert read_text_file(bad, errors="replace") == "hello \ufffd world"


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        read_documents(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no \\*.txt"):
        read_documents(tmp_path)


def test_window_count_and_contents():
    tokens = np.arange(20, dtype=np.int32)
    w = SlidingWindows(tokens, max_length=4, stride=3)
    # Starts 0, 3, ..., 15: a window needs max_length + 1 = 5 tokens, so 15 is the last.
    assert len(w) == len(range(0, 20 - 4, 3)) == 6
    x, y = w[5]
    np.testing.assert_array_equal(x, [15, 16, 17, 18])
    np.testing.assert_array_equal(y, [16, 17, 18, 19])
    assert len(SlidingWindows(tokens, 4, 1)) == 16
    assert len(SlidingWindows(tokens, 4)) == 4  # stride defaults to max_length
    xb, yb = w.batch([0, 2])
    assert xb.dtype == np.int32 and xb.shape == (2, 4)
    np.testing.assert_array_equal(yb[1], [7, 8, 9, 10])


def test_split_sizes():
    tokens = np.arange(1000)
    train, val = split_tokens(tokens, 0.9)
    assert len(train) == 900 and len(val) == 100
    np.testing.assert_array_equal(np.concatenate([train, val]), tokens)
    with pytest.raises(ValueError, match="train_ratio"):
        split_tokens(tokens, 0.0)


def test_batches_deterministic_by_seed_and_cover_each_epoch():
    w = SlidingWindows(np.arange(200, dtype=np.int32), max_length=4, stride=2)  # 98 windows
    a = WindowBatches(w, 8, seed=1)
    b = WindowBatches(w, 8, seed=1)
    c = WindowBatches(w, 8, seed=2)
    assert len(a) == 98 // 8
    for k in (0, 5, 12, 30):
        np.testing.assert_array_equal(a.batch_at(k)[0], b.batch_at(k)[0])
    assert not np.array_equal(a.batch_at(0)[0], c.batch_at(0)[0])
    assert not np.array_equal(a.batch_at(0)[0], a.batch_at(len(a))[0])  # new epoch, new order
    firsts = np.concatenate([x[:, 0] for x, _ in a.epoch(0)])
    assert len(set(firsts.tolist())) == len(firsts) == 12 * 8  # no window twice per epoch
    plain = WindowBatches(w, 8, shuffle=False, drop_last=False)
    assert len(plain) == 13
    assert list(plain)[-1][0].shape == (2, 4)
    np.testing.assert_array_equal(plain.batch_at(0)[0][:, 0], np.arange(0, 16, 2))


@pytest.mark.parametrize("tokens, kwargs, message", [
    (np.zeros(0, np.int32), dict(max_length=4), "empty: 0 tokens"),
    (np.arange(4), dict(max_length=4), "found 4 tokens.*needs at least 5"),
    (np.arange(10), dict(max_length=4, stride=0), "stride must be a positive int, got 0"),
    (np.arange(10), dict(max_length=0), "max_length must be a positive int, got 0"),
    (np.arange(10), dict(max_length=-2), "max_length must be a positive int, got -2"),
])
def test_window_errors(tokens, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SlidingWindows(tokens, **kwargs)


def test_batch_larger_than_dataset():
    w = SlidingWindows(np.arange(30), 4)
    with pytest.raises(ValueError, match="batch_size 9 is larger than the 7 windows"):
        WindowBatches(w, 9)
    assert len(WindowBatches(w, 9, drop_last=False)) == 1
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        WindowBatches(w, 0)


@pytest.mark.parametrize("use_gpt2", [False, True])
def test_token_file_round_trip(tmp_path, shared_data, use_gpt2):
    tok = GPT2Tokenizer(shared_data) if use_gpt2 else ByteTokenizer()
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("Every effort moves you.\nnaïve 東京\n")
    b.write_text("Second document.\n")
    tf = write_token_file(tmp_path / "corpus.bin", [a, b], tok)
    expected = tokenize_documents(read_documents(tmp_path), tok)
    assert isinstance(tf.tokens, np.memmap) and tf.dtype == np.uint16
    np.testing.assert_array_equal(np.asarray(tf.tokens), expected)
    header = json.loads((tmp_path / "corpus.bin.json").read_text())
    assert header == {"format": 1, "tokenizer": tok.name, "dtype": "uint16",
                      "vocab_size": tok.vocab_size, "count": len(expected)}
    reopened = TokenFile(tmp_path / "corpus.bin")
    np.testing.assert_array_equal(reopened.tokens, expected)
    assert not (tmp_path / "corpus.bin.tmp").exists()


def test_token_file_chunks_long_text(tmp_path):
    text = ("line of text\n" * (CHUNK_CHARS // 13 + 50))
    (tmp_path / "big.txt").write_text(text)
    tf = write_token_file(tmp_path / "big.bin", [tmp_path / "big.txt"], ByteTokenizer())
    assert len(tf) == len(text)
    assert bytes(np.asarray(tf.tokens[-13:], np.uint8)) == b"line of text\n"


def test_token_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        TokenFile(tmp_path / "missing.bin")
    (tmp_path / "t.txt").write_text("abc")
    write_token_file(tmp_path / "t.bin", [tmp_path / "t.txt"], ByteTokenizer())
    with open(tmp_path / "t.bin", "ab") as f:
        f.write(b"\0")  # a torn write: size no longer matches the header
    with pytest.raises(ValueError, match="7 bytes, but its header says 3 tokens"):
        TokenFile(tmp_path / "t.bin")


def test_random_windows_seeded_and_shifted(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    r = RandomWindowBatches(tokens, max_length=16, batch_size=4, seed=3)
    x, y = r.batch_at(7)
    assert x.shape == y.shape == (4, 16) and x.dtype == np.int32
    np.testing.assert_array_equal(y, x + 1)  # consecutive tokens: targets shifted by one
    np.testing.assert_array_equal(x, RandomWindowBatches(tokens, 16, 4, seed=3).batch_at(7)[0])
    assert not np.array_equal(x, r.batch_at(8)[0])
    with pytest.raises(ValueError, match="found 10 tokens"):
        RandomWindowBatches(tokens[:10], 16, 4)
