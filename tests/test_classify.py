"""Classification fine-tuning: AdamW steps of the classifier against an independent
PyTorch one (frozen leaves bitwise unchanged), pooling, the shared spam data's
counts, bad inputs, resume, and the command line end to end on a tiny model."""

from __future__ import annotations

import argparse
import io
import json
import warnings

import huggingface_hub
import jax
import numpy as np
import pytest
import torch

from jaxllm.cli import classify as classify_cli, finetune as finetune_cli
from jaxllm.data.classification import (ClassificationBatches, LabeledTextError, balance,
                                        class_ids, fixed_batches, prepare_classification,
                                        read_labeled)
from jaxllm.finetune.classify import (HEAD, add_class_head, class_logits, classify_task,
                                      trainable_for)
from jaxllm.finetune.classify_run import ClassifyConfig, finetune_classify
from jaxllm.hf import to_hf_state_dict
from jaxllm.model import init_params
from jaxllm.parity import assert_passed
from jaxllm.parity.finetune import (CLASSIFY_CONFIG, CLASSIFY_TC, N_CLASSES, PAD, TorchClassifier,
                                    classifier_steps, random_classifier)
from jaxllm.parity.finetune import classify_batches as tiny_batches
from jaxllm.tokenizer import ByteTokenizer, get_tokenizer
from jaxllm.train import init_train_state, make_train_step
from jaxllm.train.task import path_str, trainable_mask

# The tiny classifier, its batches and the independent PyTorch classifier are the
# parity checks' (`jaxllm parity` reports the same AdamW steps).
TINY, TC = CLASSIFY_CONFIG, CLASSIFY_TC


@pytest.mark.parametrize("pooling,decay_all", [("last_token", True), ("mean", False),
                                               ("last_position", True)])  # the book's replay
def test_adamw_steps_equal_torch_and_frozen_leaves_stay(pooling, decay_all):
    # every loss, the logits after training and every trained weight within 1e-5 of
    # torch's; the frozen leaves bit for bit as they started; the steps must learn
    losses, logits, weights, frozen = assert_passed(classifier_steps(pooling, decay_all))
    assert losses.tolerance == logits.tolerance == weights.tolerance == 1e-5
    assert losses.rtol == logits.rtol == weights.rtol == 0 and frozen.tolerance == 0
    assert weights.where.startswith(("gpt.", "head.")) or weights.difference == 0


logits_of = jax.jit(class_logits, static_argnames=("config", "pooling"))


def test_pooling_reads_the_last_real_token_whatever_the_padding():
    params = random_classifier(seed=3)
    batch = tiny_batches(1, seed=4)[0]
    short = {k: v[:2] for k, v in batch.items()}
    short["lengths"] = np.array([5, 9], np.int32)
    wider = dict(short, tokens=np.concatenate([short["tokens"][:, :9],
                                               np.full((2, 7), PAD, np.int32)], 1))
    narrow = dict(short, tokens=short["tokens"][:, :9])
    a = logits_of(params, wider, config=TINY)
    b = logits_of(params, narrow, config=TINY)
    np.testing.assert_allclose(a, b, atol=1e-5)  # right padding does not move the logits
    mask = (np.arange(16)[None, :] < short["lengths"][:, None]).astype(np.int32)
    np.testing.assert_allclose(logits_of(params, {"tokens": wider["tokens"], "mask": mask},
                                         config=TINY), a, atol=1e-6)
    torch_model = TorchClassifier(params, "last_position").eval()
    with torch.no_grad():
        t = torch_model(torch.from_numpy(wider["tokens"]).long(), None).numpy()
    last = np.asarray(logits_of(params, wider, config=TINY, pooling="last_position"))
    np.testing.assert_allclose(last, t, atol=1e-5)
    assert np.abs(last - np.asarray(a)).max() > 1e-3  # a pad token is not the last real one
    with pytest.raises(ValueError, match="lengths"):
        class_logits(params, {"tokens": wider["tokens"]}, TINY)


def test_head_replacement_and_trainable_presets():
    untied = TINY.replace(tie_embeddings=False)
    params = jax.eval_shape(lambda k: init_params(untied, k), jax.random.key(0))
    clf = jax.eval_shape(lambda p: add_class_head(p, untied, 4, jax.random.key(1)), params)
    assert "out_head" not in clf and clf[HEAD]["kernel"].shape == (32, 4)
    assert clf["blocks"] == params["blocks"] and clf["tok_emb"] == params["tok_emb"]
    def chosen(name):
        mask = trainable_mask(clf, trainable_for(name, TINY))
        return {path_str(p) for p, m in jax.tree_util.tree_leaves_with_path(mask) if m}

    paths = {name: chosen(name) for name in ("head", "last_block")}
    assert paths["head"] == {"class_head/kernel", "class_head/bias"}
    assert {"final_norm/scale", "blocks/1/ffn/proj/kernel"} <= paths["last_block"]
    assert not any(p.startswith(("blocks/0/", "tok_emb", "pos_emb")) for p in paths["last_block"])
    for n in (1, 0, 2.0):
        with pytest.raises(ValueError, match="n_classes >= 2"):
            add_class_head(params, TINY, n, jax.random.key(1))
    with pytest.raises(ValueError, match="matches no parameter"):
        trainable_mask(clf, trainable_for("nothing/.*", TINY))


# -- the data pipeline ---------------------------------------------------------------
def test_the_spam_collection_counts(shared_data):
    path = shared_data / "sms_spam_collection.tsv"
    texts, labels = read_labeled(path)  # every line a row: a quote is text
    assert (len(texts), labels.count("spam"), labels.count("ham")) == (5574, 747, 4827)
    with pytest.warns(UserWarning, match="line 5082: a quoted field runs on to line 5084"):
        texts, labels = read_labeled(path, quotes=True)  # as the book's pandas call reads it
    assert (len(texts), labels.count("spam"), labels.count("ham")) == (5572, 747, 4825)
    tok = get_tokenizer("gpt2", shared_data)
    with pytest.warns(UserWarning, match="line 5082"):
        data = prepare_classification(path, tok, context_length=1024, quotes=True)
    assert data.classes == ["ham", "spam"]
    assert (data.info["balanced"], len(data.train), len(data.validation), len(data.test)) == \
        (1494, 1045, 149, 300)
    assert data.max_length == 120 and data.train.tokens.shape == (1045, 120)
    assert data.info["truncated"] == {"train": 0, "validation": 0, "test": 0}
    assert int(data.train.labels.sum() + data.validation.labels.sum()
               + data.test.labels.sum()) == 747  # balanced: every spam row kept
    row = int(np.argmin(data.train.lengths))
    assert (data.train.tokens[row, data.train.lengths[row]:] == 50256).all()
    with pytest.warns(UserWarning, match="line 5082"):
        again = prepare_classification(path, tok, context_length=1024, quotes=True)
    assert np.array_equal(again.test.tokens, data.test.tokens)  # seeded: the same rows
    with pytest.warns(UserWarning, match="line 5082"):
        other = prepare_classification(path, tok, context_length=1024, seed=7, quotes=True)
    assert not np.array_equal(other.test.tokens, data.test.tokens)


def test_batches_are_seeded_resumable_and_weighted():
    rows = 21
    labels = np.arange(rows) % 3
    from jaxllm.data.classification import Split
    split = Split(np.arange(rows * 4, dtype=np.int32).reshape(rows, 4),
                  np.full(rows, 4, np.int32), labels.astype(np.int32), [""] * rows)
    b = ClassificationBatches(split, 8, seed=1)
    assert b.batches_per_epoch == 2  # drop_last
    epoch0 = np.concatenate([b.batch_at(k)["labels"] for k in range(2)])
    assert np.array_equal(ClassificationBatches(split, 8, seed=1).batch_at(3)["tokens"],
                          b.batch_at(3)["tokens"])
    assert not np.array_equal(b.batch_at(0)["tokens"], b.batch_at(2)["tokens"])
    assert len(epoch0) == 16
    fixed = fixed_batches(split, 8)
    assert [f["weight"].sum() for f in fixed] == [8, 8, 5]
    assert all(f["tokens"].shape == (8, 4) for f in fixed)
    kept = balance(np.array([0, 0, 0, 1, 1, 2, 2, 2]), 0)
    assert sorted(np.bincount(np.array([0, 0, 0, 1, 1, 2, 2, 2])[kept]).tolist()) == [2, 2, 2]


def test_bad_inputs_are_named(tmp_path):
    def write(name, text):
        p = tmp_path / name
        p.write_text(text)
        return p

    with pytest.raises(FileNotFoundError, match="no such file"):
        read_labeled(tmp_path / "absent.tsv")
    with pytest.raises(LabeledTextError, match="is empty"):
        read_labeled(write("empty.tsv", "\n\n"))
    with pytest.raises(LabeledTextError, match="line 2: 3 field"):
        read_labeled(write("three.tsv", "ham\thello\nspam\tbuy\tnow\n"))
    with pytest.raises(LabeledTextError, match="line 1: 1 field"):
        read_labeled(write("one.tsv", "no tab here\n"))
    with pytest.raises(LabeledTextError, match="no text column 'body'"):
        read_labeled(write("cols.csv", "label,text\na,b\n"), text_column="body")
    with pytest.raises(ValueError, match=r"\['eggs'\] are not among the classes"):
        class_ids(["ham", "eggs"], ["ham", "spam"])
    with pytest.raises(ValueError, match=r"\['spam'\] are not among the classes \['ham'\]"):
        class_ids(["ham", "spam"], ["ham"])  # the label the data has, not the count, named
    with pytest.raises(ValueError, match=r"class\(es\) \['other'\] have no rows in the data"):
        class_ids(["ham", "spam"], ["ham", "spam", "other"])
    with pytest.raises(ValueError, match="at least 2 classes"):
        class_ids(["ham", "ham"])
    typo = write("typo.tsv", "".join(f"{'ham' if i % 2 else 'spam'}\tmessage {i}\n"
                                     for i in range(40)) + "sapm\toops\n")
    with pytest.warns(UserWarning, match=r"class 'sapm' has only 1 row\(s\) \(the first is "
                                         r"data row 41\); a mistyped label\?"):
        prepare_classification(typo, ByteTokenizer(), context_length=64, balanced=False)
    with pytest.raises(LabeledTextError, match=r"typo.tsv: label\(s\) \['sapm'\] are not among "
                                               r"the classes \['ham', 'spam'\] \(the first on "
                                               r"data row 41: 'sapm'\)"):
        prepare_classification(typo, ByteTokenizer(), context_length=64, classes=["ham", "spam"])
    one_class = write("one_class.tsv", "".join(f"ham\tmessage {i}\n" for i in range(20)))
    with pytest.raises(ValueError, match="at least 2 classes"):
        prepare_classification(one_class, ByteTokenizer(), context_length=32)
    texts = write("long.tsv", "".join(f"{'ab'[i % 2]}\t{'x' * (5 + i)}\n" for i in range(40)))
    with pytest.warns(UserWarning, match=r"text\(s\) longer than 16 tokens were truncated"):
        data = prepare_classification(texts, ByteTokenizer(), context_length=16)
    assert data.max_length == 16 and sum(data.info["truncated"].values()) > 0


def test_a_stray_quote_or_a_byte_order_mark_loses_no_row(tmp_path):
    rows = ['ham\t"He said hi'] + [f"{'spam' if i % 2 else 'ham'}\tmessage {i}" for i in range(35)]
    tsv = tmp_path / "quote.tsv"
    tsv.write_text("\n".join(rows) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn of: a quote in a TSV is text
        texts, labels = read_labeled(tsv)
    assert len(texts) == 36 and texts[0] == '"He said hi' and texts[-1] == "message 34"
    with pytest.warns(UserWarning, match=r"quote.tsv, line 1: a quoted field runs on to line "
                                         r"36, making 36 lines one row"):
        assert len(read_labeled(tsv, quotes=True)[0]) == 1  # what quoting on would make of it

    csv_file = tmp_path / "quote.csv"
    csv_file.write_text('label,text\nham,"fine\nspam,win now\nham,see you\n')
    with pytest.warns(UserWarning, match=r"quote.csv, line 2: a quoted field runs on to line 4"):
        texts, labels = read_labeled(csv_file)
    assert labels == ["ham"] and texts == ["fine\nspam,win now\nham,see you\n"]

    bom = "\ufeff".encode()
    (tmp_path / "bom.tsv").write_bytes(bom + b"ham\thello\nspam\tbuy\n")
    assert read_labeled(tmp_path / "bom.tsv") == (["hello", "buy"], ["ham", "spam"])
    (tmp_path / "bom.csv").write_bytes(bom + b"label,text\nham,hello\nspam,buy\n")
    assert read_labeled(tmp_path / "bom.csv") == (["hello", "buy"], ["ham", "spam"])


# -- the loop and the command line ---------------------------------------------------
def spam_like(path, n=64):
    """A CSV with a header and three classes: a tiny learnable problem."""
    rng = np.random.default_rng(0)
    words = {"spam": "win free prize cash now", "ham": "see you at lunch ok",
             "news": "the market fell today"}
    lines = ["id,category,message"]
    for i in range(n):
        c = list(words)[i % 3]
        ws = words[c].split()
        lines.append(f"{i},{c},\"{' '.join(rng.choice(ws, rng.integers(2, 6)))}\"")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(module, argv) -> int:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def test_resume_writes_what_an_uninterrupted_run_would(tmp_path):
    config = TINY.replace(vocab_size=257, context_length=24)
    with pytest.warns(UserWarning, match="truncated"):  # rows cut to the context: still fine
        data = prepare_classification(spam_like(tmp_path / "d.csv"), ByteTokenizer(),
                                      context_length=24, label_column="category",
                                      text_column="message")
    tc = TC.replace(batch_size=4, total_steps=6)
    cc = ClassifyConfig(eval_every=3, save_every=3, eval_batches=2)
    kw = dict(tokenizer_name="byte", progress=False)
    whole = finetune_classify(tmp_path / "a", config, tc, cc, data, **kw)
    finetune_classify(tmp_path / "b", config, tc, cc, data, stop_at=3, **kw)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        finetune_classify(tmp_path / "b", config, tc, cc, data, **kw)
    resumed = finetune_classify(tmp_path / "b", config, tc, cc, data, resume=True, **kw)
    assert resumed["resumed_from"] == 3 and resumed["accuracy"] == whole["accuracy"]
    read = [[json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
            for r in "ab"]
    assert read[0] == read[1]


def test_cli_fine_tunes_resumes_and_classifies(shared_data, tmp_path, capsys, monkeypatch):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(dict(vocab_size=50257, context_length=64, emb_dim=32, n_heads=4,
                                   n_layers=2, drop_rate=0.0)))
    data = shared_data / "sms_spam_collection.tsv"
    out = tmp_path / "run"
    argv = ["classify", "--init", "random", "--config", str(cfg), "--data", str(data),
            "--tokenizer-dir", str(shared_data), "--steps", "4", "--eval-every", "2",
            "--eval-batches", "2", "--protocol", "book", "--trainable", "head",
            "--set", "batch_size=16",
            "--set", "lr=1e-3", "--out", str(out), "--quiet"]
    assert run_cli(finetune_cli, argv) == 0
    captured = capsys.readouterr()
    assert "accuracy: train" in captured.out and "5,572 rows" in captured.err
    assert "text(s) longer than 64 tokens were truncated" in captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["pooling"] == "last_position"
    assert summary["trainable_params"] == 32 * 2 + 2
    assert set(summary["accuracy"]) == {"train", "validation", "test"}
    for f in ("metrics.jsonl", "loss.png", "accuracy.png", "config.json"):
        assert (out / f).stat().st_size > 0
    assert run_cli(finetune_cli, argv) == 2  # not --resume: refused
    assert "already holds checkpoints" in capsys.readouterr().err
    assert run_cli(finetune_cli, argv + ["--resume"]) == 0  # finished: nothing more to do
    capsys.readouterr()

    texts = tmp_path / "texts.txt"
    texts.write_text("WINNER!! Claim your prize now\n\nsee you at lunch\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("call me later\n"))
    assert run_cli(classify_cli, ["--run-dir", str(out), "--text", "free cash",
                                  "--file", str(texts), "--tokenizer-dir", str(shared_data)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(x.split("\t")[0] in ("ham", "spam") for x in lines)
    assert all(0.5 <= float(x.split("\t")[1]) <= 1.0 for x in lines)
    assert run_cli(classify_cli, ["--run-dir", str(out), "--file", "-", "--json",
                                  "--tokenizer-dir", str(shared_data)]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["text"] == "call me later" and abs(sum(r["probabilities"].values()) - 1) < 1e-5


def test_cli_errors_name_what_is_wrong(shared_data, tmp_path, capsys, monkeypatch):
    data = shared_data / "sms_spam_collection.tsv"
    empty_hf = tmp_path / "gpt2"
    empty_hf.mkdir()
    (empty_hf / "config.json").write_text("{}")
    cases = [
        (["--hf", str(empty_hf), "--data", str(data)], "holds no model.safetensors"),
        (["--init", "random", "--data", str(tmp_path / "none.tsv")], "no such file"),
        (["--init", "random", "--data", str(data), "--classes", "ham,eggs"],
         "label(s) ['spam'] are not among the classes ['ham', 'eggs']"),
        (["--hf", "no-such-org/no-such-model", "--data", str(data)], "the hub cannot be "
                                                                    "reached"),
    ]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here
    for argv, message in cases:
        assert run_cli(finetune_cli, ["classify", *argv, "--out", str(tmp_path / "r")]) == 2
        assert message in capsys.readouterr().err
    not_a_run = tmp_path / "nothing"
    assert run_cli(classify_cli, ["--run-dir", str(not_a_run), "--text", "hi"]) == 2
    assert "no checkpoints" in capsys.readouterr().err
    assert run_cli(classify_cli, ["--run-dir", str(not_a_run)]) == 2
    assert "no texts" in capsys.readouterr().err


def test_hf_folders_with_either_weights_file(tmp_path):
    from jaxllm.hf import open_weights

    params = random_classifier(5)
    params = {k: v for k, v in params.items() if k != HEAD}
    sd = to_hf_state_dict(params, TINY)
    folder = tmp_path / "bin"
    folder.mkdir()
    # a GPT2Model checkpoint: no "transformer." prefix, no lm_head
    torch.save({k.removeprefix("transformer."): torch.from_numpy(v.copy())
                for k, v in sd.items() if k.startswith("transformer.")},
               folder / "pytorch_model.bin")
    read = open_weights(str(folder))
    assert set(read.names) == {k for k in sd if k.startswith("transformer.")}
    assert all(np.array_equal(read.get(k), sd[k]) for k in read.names)


def test_cli_names_a_file_it_cannot_read(tmp_path, capsys, monkeypatch):
    """A missing file, a folder or bad UTF-8 is one line naming the file (and
    the line); a good file is classified by the run."""
    from jaxllm.train import checkpoint

    config = TINY.replace(vocab_size=257)
    params = add_class_head(init_params(config, jax.random.key(0)), config, 2,
                            jax.random.key(1))
    run = tmp_path / "run"
    checkpoint.save(checkpoint.open_manager(run, create=True), init_train_state(params, TC),
                    {"model": config.to_dict(), "tokenizer": "byte", "kind": "classify",
                     "classes": ["ham", "spam"], "max_length": 32, "pad_id": 256,
                     "classify": {"pooling": "last_token"}})
    good = tmp_path / "good.txt"
    good.write_bytes("\ufeffcafé au lait\n\nfree cash\r\n".encode())
    assert run_cli(classify_cli, ["--run-dir", str(run), "--file", str(good)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [x.split("\t")[2] for x in lines] == ["café au lait", "free cash"]
    assert all(x.split("\t")[0] in ("ham", "spam") for x in lines)
    # a text longer than the classifier's 32-token rows: labelled on its start, said so
    long = "win " * 10
    assert run_cli(classify_cli, ["--run-dir", str(run), "--text", long, "--text", "short",
                                  "--json"]) == 0
    captured = capsys.readouterr()
    assert [json.loads(x)["truncated"] for x in captured.out.splitlines()] == [True, False]
    assert captured.err == (f"warning: text 1 ({long[:40]!r}...) is longer than the 32 tokens "
                            "the classifier reads (its training rows' width); it was labelled "
                            "on its first 32 tokens only\n")

    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\ncaf\xe9\n")
    cases = [(str(bad), f"--file {bad} line 3 is not valid UTF-8 (byte 3 of the line is "
                        f"b'\\xe9')"),
             (str(tmp_path / "none.txt"), f"--file {tmp_path / 'none.txt'}: no such file"),
             (str(tmp_path), f"--file {tmp_path} is a folder")]
    for path, message in cases:
        assert run_cli(classify_cli, ["--run-dir", str(run), "--file", path]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith(f"jaxllm classify: error: {message}")
        assert captured.err.count("\n") == 1 and "Errno" not in captured.err
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"ok\n\xff\n")))
    assert run_cli(classify_cli, ["--run-dir", str(run), "--file", "-"]) == 2
    assert "standard input line 2 is not valid UTF-8" in capsys.readouterr().err


def test_a_frozen_block_costs_its_forward_products_only():
    """One more frozen block adds to the compiled step exactly the matrix products
    it adds to the forward pass: no gradient work. A trained one adds more."""
    from experiments.bench_classify import hlo_dots

    rng = np.random.default_rng(0)
    batch = {"tokens": rng.integers(0, 96, (4, 16)).astype(np.int32),
             "lengths": rng.integers(1, 17, 4).astype(np.int32),
             "labels": rng.integers(0, N_CLASSES, 4).astype(np.int32)}
    task = classify_task("last_token")

    def dots(n_layers, trainable):
        config = TINY.replace(n_layers=n_layers)
        key = jax.random.key(0)
        params = add_class_head(init_params(config, key), config, N_CLASSES, key)
        forward = jax.jit(lambda p, b: task(p, b, config, None)[0]).lower(params, batch)
        spec = trainable_for(trainable, config)
        step = make_train_step(config, TC, task=task, trainable=spec, jit=False)
        state = init_train_state(params, TC, trainable=spec)
        compiled = jax.jit(step).lower(state, batch).compile()
        return hlo_dots(forward.compile().as_text()), hlo_dots(compiled.as_text())

    (fwd2, frozen2), (fwd3, frozen3) = dots(2, "last_block"), dots(3, "last_block")
    assert fwd3 - fwd2 > 0 and frozen3 - frozen2 == fwd3 - fwd2
    (_, all2), (_, all3) = dots(2, "all"), dots(3, "all")
    assert all3 - all2 > 2 * (fwd3 - fwd2)  # a trained block: forward, input and weight grads
