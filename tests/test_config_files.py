"""`--config FILE.json`: every section and field checked, naming the file, section and field."""

import json

import pytest

from jaxllm.cli.pretrain import _read_config_file


def write(tmp_path, data, raw=None):
    p = tmp_path / "run.json"
    p.write_text(raw if raw is not None else json.dumps(data))
    return p


@pytest.mark.parametrize("data, message", [
    ({"model": {}, "train": {"lr": "fast"}}, r"section 'train': lr must be float, got str 'fast'"),
    ({"model": {}, "train": {"lr": None}}, r"section 'train': lr must be float, got null"),
    ({"model": {}, "train": {"learning_rate": 1e-3}}, r"section 'train': unknown field 'learning_rate'"),
    ({"model": {}, "trian": {"lr": 1e-3}}, r"unknown section\(s\) \['trian'\]"),
    ({"model": {"emb_dim": 64.5}}, r"section 'model': emb_dim must be int, got float 64.5"),
    ({"model": {"qkv_bias": 1}}, r"section 'model': qkv_bias must be bool, got int 1"),
    ({"model": [], "train": {}}, r"section 'model' must be an object"),
    ({"lr": "fast"}, r"lr must be float, got str"),
    ({"lrr": 1.0}, r"unknown field 'lrr'"),
])
def test_bad_fields_and_sections_name_the_file_section_and_field(tmp_path, data, message):
    p = write(tmp_path, data)
    with pytest.raises(ValueError, match=f"config file {p}.*{message}"):
        _read_config_file(str(p))


def test_good_files_pass_and_a_runs_record_is_accepted(tmp_path):
    sections = _read_config_file(str(write(tmp_path, {
        "model": {"emb_dim": 64, "ffn_dim": None}, "train": {"lr": 1, "grad_clip": None},
        "tokenizer": "byte", "format": 1, "data": {"train_tokens": 10}})))
    assert sections["model"] == {"emb_dim": 64, "ffn_dim": None}
    assert sections["train"] == {"lr": 1, "grad_clip": None} and sections["loop"] == {}
    assert _read_config_file(str(write(tmp_path, {"lr": 0.5, "emb_dim": 32})))["train"] == {"lr": 0.5}


def test_malformed_json_names_the_file(tmp_path):
    p = write(tmp_path, None, raw='{"model": {"emb_dim": 64,}}')
    with pytest.raises(ValueError, match=f"config file {p} is not valid JSON"):
        _read_config_file(str(p))


# -- range errors: the file's own values are named like its type errors -------------------
def _configs(*argv):
    import argparse

    from jaxllm.cli import pretrain

    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    return pretrain.build_configs(parser.parse_args(list(argv)))


@pytest.mark.parametrize("data, message", [
    ({"model": {}, "loop": {"save_every": 0}},
     ", section 'loop': save_every must be a positive int, got 0"),
    ({"model": {}, "train": {"lr": -1.0}}, ", section 'train': lr must be a positive number"),
    ({"model": {"emb_dim": 0}}, ", section 'model': emb_dim must be a positive int, got 0"),
    ({"model": {"emb_dim": 100}}, ", section 'model': emb_dim (100) must be divisible by "
                                  "n_heads (12)"),
    ({"save_every": 0}, ": save_every must be a positive int, got 0"),  # flat: no section
])
def test_range_errors_name_the_file_section_and_field(tmp_path, data, message):
    p = write(tmp_path, data)
    with pytest.raises(ValueError) as err:
        _configs("--config", str(p))
    assert str(err.value).startswith(f"config file {p}{message}")


def test_range_errors_from_the_command_line_are_not_blamed_on_the_file(tmp_path, capsys):
    from jaxllm.cli import main

    p = write(tmp_path, {"model": {}, "loop": {"save_every": 0}})
    assert _configs("--config", str(p), "--save-every", "5")[2].save_every == 5  # repaired
    good = write(tmp_path, {"model": {}, "loop": {"save_every": 10}})
    with pytest.raises(ValueError, match="^LoopConfig.save_every must be a positive int"):
        _configs("--config", str(good), "--set", "save_every=0")
    bad = write(tmp_path, {"model": {}, "loop": {"save_every": 0}})
    assert main(["pretrain", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == (f"jaxllm pretrain: error: config file {bad}, section 'loop': save_every "
                   f"must be a positive int, got 0\n")


# -- the fine-tuning commands' --config: one GPTConfig object --------------------------------
@pytest.mark.parametrize("raw, message", [
    ('{"emb_dim": 64, "n_heads": 4,}', " is not valid JSON: Expecting property name"),
    (json.dumps({"model": {"emb_dim": 64}, "train": {"lr": 1e-3}}),
     ' is a sectioned `jaxllm pretrain` config (sections model, train); this --config takes '
     'the GPTConfig fields alone: give the content of its "model" section as the whole file'),
    (json.dumps({"emb_dim": 0}), ": GPTConfig.emb_dim must be a positive int, got 0"),
])
def test_the_fine_tuning_config_names_the_file(shared_data, tmp_path, capsys, raw, message):
    from jaxllm.cli import main

    p = write(tmp_path, None, raw=raw)
    argv = ["finetune", "classify", "--init", "random", "--config", str(p), "--data",
            str(shared_data / "sms_spam_collection.tsv"), "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jaxllm finetune classify: error: config file {p}{message}")
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()
