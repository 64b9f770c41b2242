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
