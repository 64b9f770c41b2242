"""LoRA through the command line: `jaxllm pretrain` runs resumed with or without
the LoRA flags, the tied head merged into an untied Hugging Face model."""

from __future__ import annotations

import json
import re
import shutil

import jax
import numpy as np

from jaxllm import apply, from_hf_state_dict, lora
from jaxllm.cli import main
from jaxllm.config import get_preset
from jaxllm.model import init_params
from jaxllm.train import TrainConfig, checkpoint, init_train_state

TINY = ["--preset", "small", "--set", "context_length=16", "--set", "n_layers=1",
        "--set", "emb_dim=32", "--set", "n_heads=2", "--set", "batch_size=2",
        "--set", "eval_batches=1", "--set", "sample_tokens=2", "--eval-every", "100", "--quiet"]
CONFIG = get_preset("small").replace(context_length=16, n_layers=1, emb_dim=32, n_heads=2)


def leaves(params):
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(params)}


def test_pretrain_lora_run_resumes_as_saved_and_refuses_other_flags(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert main(["pretrain", *TINY, "--steps", "2", "--out", run, "--lora-rank", "4",
                 "--lora-alpha", "8", "--lora-targets", "attn,head"]) == 0
    first, config, _ = checkpoint.load_params(run)
    assert config.tie_embeddings and sorted(lora.adapters_of(first)[0]) == \
        ["blocks/0/attn/out", "blocks/0/attn/qkv", "out_head"]  # the tied head adapted

    # no LoRA flags: the run goes on with its own adapters, and says so
    assert main(["pretrain", *TINY, "--steps", "4", "--out", run, "--resume"]) == 0
    err = capsys.readouterr().err
    assert ("resuming the run's LoRA adapters (targets attn,head, rank 4, alpha 8, scale peft: "
            "alpha / rank, qkv split)") in err
    record = json.loads((tmp_path / "run" / "config.json").read_text())["lora"]
    assert {k: record[k] for k in ("rank", "alpha", "scale", "init", "targets", "qkv")} == \
        {"rank": 4, "alpha": 8.0, "scale": "peft", "init": "peft", "targets": "attn,head",
         "qkv": "split"}
    second = checkpoint.load_params(run)[0]
    adapters, scales = lora.adapters_of(second)
    assert set(scales.values()) == {2.0}  # alpha 8 / rank 4, as saved
    base = leaves(init_params(config, jax.random.key(TrainConfig().seed)))
    for name, x in leaves(lora.strip_adapters(second)).items():  # frozen: bitwise the init
        np.testing.assert_array_equal(x, base[name], err_msg=name)
    moved = [p for p, ab in lora.adapters_of(first)[0].items()
             if not np.array_equal(np.asarray(ab["b"]), np.asarray(adapters[p]["b"]))]
    assert sorted(moved) == sorted(adapters)

    # the same flags are fine; different ones are refused, naming the flag and the saved value
    for flags, message in [
        (["--lora-alpha", "2"], "--lora-alpha 2: .* was trained with --lora-alpha 8"),
        (["--lora-rank", "2"], "--lora-rank 2: .* was trained with --lora-rank 4"),
        (["--lora-targets", "all"], "--lora-targets all: .* was trained with --lora-targets "
                                    "attn,head"),
        (["--lora-qkv", "fused"], "--lora-qkv fused: .* was trained with --lora-qkv split"),
    ]:
        assert main(["pretrain", *TINY, "--steps", "6", "--out", run, "--resume", *flags]) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), (flags, err)
    assert checkpoint.load_params(run)[0]["blocks"][0]["attn"]["qkv"]["lora"]["b"].shape == \
        (3, 4, 32)

    # the merged tied head: an untied Hugging Face model with the adapter in lm_head.weight
    hf = tmp_path / "hf"
    assert main(["lora", "merge", "--run-dir", run, "--out", str(hf)]) == 0
    assert '"tie_word_embeddings": false' in (hf / "config.json").read_text()
    # the export says it is a byte-vocabulary model: generate needs no --tokenizer
    assert json.loads((hf / "config.json").read_text())["jaxllm_tokenizer"]["name"] == "byte"
    assert main(["generate", "--hf", str(hf), "--prompt", "Hi", "--max-new-tokens", "2"]) == 0
    untied = config.replace(tie_embeddings=False)
    merged = from_hf_state_dict(hf / "model.safetensors", untied)
    x = np.array([[1, 2, 3, 4, 5]], np.int32)
    np.testing.assert_allclose(np.asarray(apply(merged, x, untied)),
                               np.asarray(apply(second, x, config)), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(merged["tok_emb"]["embedding"])[:257],
                                  base["['tok_emb']['embedding']"][:257])


def test_lora_flags_on_resuming_a_run_without_adapters_are_refused(tmp_path, capsys):
    run = tmp_path / "plain"
    tc = TrainConfig()
    checkpoint.save(checkpoint.open_manager(run, create=True),
                    init_train_state(init_params(CONFIG, jax.random.key(0)), tc),
                    {"model": CONFIG.to_dict(), "tokenizer": "byte"})
    assert main(["pretrain", *TINY, "--steps", "2", "--out", str(run), "--resume",
                 "--lora-rank", "4"]) == 2
    assert f"--lora-rank: {run} was trained without adapters" in capsys.readouterr().err
    assert main(["pretrain", *TINY, "--out", str(tmp_path / "new"), "--lora-targets", "attn"]) == 2
    assert "--lora-targets needs --lora-rank" in capsys.readouterr().err


# -- the fine-tuning commands ------------------------------------------------------
FT_CONFIG = dict(vocab_size=257, context_length=32, emb_dim=32, n_heads=4, n_layers=2,
                 drop_rate=0.0)


def spam_file(path):
    rows = [f"spam\tWIN a FREE prize number {i} now, call 0800 {i}" for i in range(30)]
    rows += [f"ham\tsee you at lunch on day {i}, ok?" for i in range(30)]
    path.write_text("\n".join(rows) + "\n")
    return path


def test_finetune_classify_with_lora_trains_adapters_and_head_only(tmp_path, capsys):
    from jaxllm.finetune.classify import HEAD
    from jaxllm.finetune.classify_run import classify_texts, load_classifier

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(FT_CONFIG))
    run = tmp_path / "clf"
    argv = ["finetune", "classify", "--init", "random", "--config", str(cfg), "--tokenizer",
            "byte", "--data", str(spam_file(tmp_path / "spam.tsv")), "--steps", "3",
            "--eval-every", "3", "--eval-batches", "1", "--save-every", "1", "--set", "batch_size=4",
            "--set", "lr=1e-2", "--out", str(run), "--quiet"]
    assert main([*argv, "--lora-rank", "2"]) == 0  # the blocks, by default
    assert "LoRA: 8 adapted dense layers" in capsys.readouterr().err
    clf = load_classifier(run)
    config, trained = clf["config"], leaves(clf["params"])
    adapters = lora.adapters_of(clf["params"])[0]
    assert sorted(adapters) == sorted(f"blocks/{i}/{n}" for i in range(2)
                                      for n in ("attn/qkv", "attn/out", "ffn/fc", "ffn/proj"))
    summary = json.loads((run / "summary.json").read_text())
    head = 32 * 2 + 2
    assert summary["trainable_params"] == lora.count_lora_params(adapters) + head
    # every model weight frozen: bitwise the loop's own draw (its LM head replaced)
    seed = json.loads((run / "config.json").read_text())["train"]["seed"]
    k_model = jax.random.split(jax.random.key(seed))[0]
    base = leaves({k: v for k, v in init_params(config, k_model).items() if k != "out_head"})
    stripped = lora.strip_adapters(clf["params"])
    model_part = leaves({k: v for k, v in stripped.items() if k != HEAD})
    assert HEAD in stripped and set(model_part) == set(base)
    for name, x in model_part.items():
        np.testing.assert_array_equal(x, base[name], err_msg=name)
    assert any(np.abs(np.asarray(ab["b"])).max() > 0 for ab in adapters.values())

    # inference reads the adapters; the merged run folder classifies the same
    texts = ["FREE prize, call now", "lunch today?"]
    before = classify_texts(run, texts)
    merged = tmp_path / "merged"
    assert main(["lora", "merge", "--run-dir", str(run), "--out", str(merged)]) == 0
    assert "classifier run folder" in capsys.readouterr().out
    assert lora.adapters_of(load_classifier(merged)["params"])[0] == {}
    after = classify_texts(merged, texts)
    assert [b["label"] for b in before] == [a["label"] for a in after]
    for b, a in zip(before, after):
        for label, p in b["probabilities"].items():
            assert abs(p - a["probabilities"][label]) < 1e-5

    # the last checkpoint lost, resumed without the flags: the run's own adapters train on
    # from step 2 to the same weights
    shutil.rmtree(run / "checkpoints" / "3")
    assert main([*argv, "--resume"]) == 0
    assert "resuming the run's LoRA adapters (targets attn,ffn, rank 2" in capsys.readouterr().err
    for name, x in leaves(load_classifier(run)["params"]).items():
        np.testing.assert_array_equal(x, trained[name], err_msg=name)
    assert main([*argv, "--out", str(tmp_path / "x"), "--lora-rank", "2",
                 "--trainable", "all"]) == 2
    assert "--trainable all trains every weight" in capsys.readouterr().err

    # a LoRA run as the start of another: its adapters merged first, and the new run resumes
    start = [a for a in argv if a not in ("--init", "random", "--config", str(cfg))]
    start = [*start[:start.index("--out")], *start[start.index("--out") + 2:]]
    new = ["--run-dir", str(run), *start[2:], "--out", str(tmp_path / "next")]
    assert main(["finetune", "classify", *new]) == 0
    assert "its 8 LoRA adapters merged into the weights" in capsys.readouterr().err
    assert lora.adapters_of(load_classifier(tmp_path / "next")["params"])[0] == {}
    steps = new.index("--steps") + 1
    assert main(["finetune", "classify", *new[:steps], "5", *new[steps + 1:], "--resume"]) == 0
    assert main(["lora", "merge", "--run-dir", str(run), "--out", str(tmp_path / "next")]) == 2
    assert "is not empty; merge writes a new folder" in capsys.readouterr().err


def test_finetune_classify_book_protocol_is_appendix_e(tmp_path, capsys):
    """--protocol book with LoRA: adapters on every linear layer and the class
    head (a rank above the head's 2 columns, as the book has it, without a
    warning), the head's own weights frozen, the book's scale and init, lr
    8e-4 and the rest of chapter 6's settings; recorded, resumed, exported."""
    from jaxllm.finetune.classify import HEAD, add_class_head
    from jaxllm.finetune.classify_run import load_classifier

    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(FT_CONFIG))
    run = tmp_path / "book"
    argv = ["finetune", "classify", "--init", "random", "--config", str(cfg), "--tokenizer",
            "byte", "--data", str(spam_file(tmp_path / "spam.tsv")), "--steps", "2",
            "--eval-every", "2", "--eval-batches", "1", "--save-every", "1", "--out", str(run),
            "--quiet", "--protocol", "book"]
    assert main([*argv, "--lora-rank", "4", "--lora-alpha", "4"]) == 0
    err = capsys.readouterr().err
    assert "LoRA: 9 adapted dense layers" in err and "scale book: alpha, init book" in err
    assert "exceeds the smaller dimension" not in err
    meta = json.loads((run / "config.json").read_text())
    train = meta["train"]
    assert (train["lr"], train["weight_decay"], train["weight_decay_on"], train["batch_size"],
            train["beta1"], train["beta2"], train["eps"], train["warmup_steps"],
            train["min_lr_ratio"], train["grad_clip"], train["seed"]) == \
        (8e-4, 0.1, "all", 8, 0.9, 0.999, 1e-8, 0, 1.0, None, 123)
    assert meta["classify"]["pooling"] == "last_position"
    assert meta["classify"]["trainable"] == lora.TRAINABLE  # the adapters alone
    assert {k: meta["lora"][k] for k in ("rank", "alpha", "scale", "init", "targets")} == \
        {"rank": 4, "alpha": 4.0, "scale": "book", "init": "book", "targets": "all"}
    clf = load_classifier(run)
    adapters, scales = lora.adapters_of(clf["params"])
    assert HEAD in adapters and len(adapters) == 9 and set(scales.values()) == {4.0}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trainable_params"] == lora.count_lora_params(adapters)
    # the class head's own weights: the loop's draw, untouched
    k_model, k_head = jax.random.split(jax.random.key(123))
    drawn = add_class_head(init_params(clf["config"], k_model), clf["config"], 2, k_head)[HEAD]
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(np.asarray(clf["params"][HEAD][name]),
                                      np.asarray(drawn[name]))
    assert np.abs(np.asarray(adapters[HEAD]["b"])).max() > 0  # its adapter trained

    # resumed without the LoRA flags: the run's own adapters, lr and conventions
    shutil.rmtree(run / "checkpoints" / "2")
    assert main([*argv, "--resume"]) == 0
    assert "scale book: alpha" in capsys.readouterr().err
    assert main([*argv, "--resume", "--lora-scale", "peft"]) == 2
    assert "--lora-scale peft: " in capsys.readouterr().err
    assert main([*argv, "--resume", "--lora-init", "peft"]) == 2
    assert "was trained with --lora-init book" in capsys.readouterr().err

    # exported with its conventions; the file reloads with the run's scale
    out = tmp_path / "adapters.safetensors"
    assert main(["lora", "export", "--run-dir", str(run), "--out", str(out)]) == 0
    _, alpha, file_meta = lora.read_adapters(out)
    assert (alpha, file_meta["scale"], file_meta["init"]) == (4.0, "book", "book")
    reloaded = lora.load_adapters(out, lora.strip_adapters(clf["params"]), clf["config"])
    assert set(lora.adapters_of(reloaded)[1].values()) == {4.0}

    # outside the book protocol, the same rank on the head is a warning, not a refusal
    default = [a for a in argv if a not in ("--protocol", "book")]
    assert main([*default, "--out", str(tmp_path / "warned"), "--steps", "1",
                 "--lora-rank", "4", "--lora-targets", "all"]) == 0
    err = capsys.readouterr().err
    assert "warning: LoRA rank 4 exceeds the smaller dimension of class_head (32 x 2)" in err
    meta = json.loads((tmp_path / "warned" / "config.json").read_text())
    assert (meta["train"]["lr"], meta["train"]["weight_decay_on"], meta["lora"]["scale"]) == \
        (5e-5, "matrices", "peft")


def test_finetune_instruct_with_lora_freezes_the_base_and_merges(tmp_path, capsys):
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({**FT_CONFIG, "context_length": 256}))
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Add {i} and 1.", "input": "",
                                 "output": f"{i + 1}"} for i in range(40)]))
    run = tmp_path / "sft"
    assert main(["finetune", "instruct", "--init", "random", "--config", str(cfg),
                 "--tokenizer", "byte", "--data", str(data), "--steps", "2",
                 "--eval-every", "2", "--set", "batch_size=4", "--set", "lr=1e-2",
                 "--set", "sample_count=0", "--set", "eval_batches=1", "--no-responses",
                 "--out", str(run), "--quiet", "--lora-rank", "4", "--lora-alpha", "8",
                 "--lora-targets", "attn,head"]) == 0
    capsys.readouterr()
    params, config, _ = checkpoint.load_params(run)
    adapters, scales = lora.adapters_of(params)
    assert sorted(adapters) == ["blocks/0/attn/out", "blocks/0/attn/qkv", "blocks/1/attn/out",
                                "blocks/1/attn/qkv", "out_head"]
    assert set(scales.values()) == {2.0}
    base = leaves(init_params(config, jax.random.key(TrainConfig().seed)))
    for name, x in leaves(lora.strip_adapters(params)).items():
        np.testing.assert_array_equal(x, base[name], err_msg=name)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["trainable_params"] == lora.count_lora_params(adapters)

    hf = tmp_path / "hf"
    assert main(["lora", "merge", "--run-dir", str(run), "--out", str(hf)]) == 0
    untied = config.replace(tie_embeddings=False)
    merged = from_hf_state_dict(hf / "model.safetensors", untied)
    x = np.array([[1, 2, 3, 4, 5]], np.int32)
    np.testing.assert_allclose(np.asarray(apply(merged, x, untied)),
                               np.asarray(apply(params, x, config)), atol=1e-5)


def test_pretrain_on_a_mesh_replicates_the_adapters_without_a_warning(tmp_path, recwarn,
                                                                       capsys):
    assert main(["pretrain", *TINY, "--steps", "1", "--out", str(tmp_path / "run"),
                 "--mesh", "data=1", "--lora-rank", "2"]) == 0
    assert not [w for w in recwarn if "partition rule" in str(w.message)]
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(["lora", "export", "--run-dir", str(run), "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a folder; export writes one file" in capsys.readouterr().err
    assert main(["lora", "merge", "--run-dir", str(run), "--out", str(run / "config.json")]) == 2
    assert "is a file; merge writes a folder" in capsys.readouterr().err
