"""Sliding-window perplexity against transformers, computed as Hugging Face's
perplexity guide computes it, on the same random GPT-2 weights."""

import json

import numpy as np
import pytest
import torch

from jaxllm import GPTConfig
from jaxllm.cli import main
from jaxllm.eval.perplexity import sliding_window_perplexity
from jaxllm.eval.score import Scored, score
from jaxllm.hf import load_hf, save_safetensors
from jaxllm.parity.reference import hf_config, hf_model, random_params
from jaxllm.tokenizer import ByteTokenizer

CFG = GPTConfig(vocab_size=257, context_length=32, emb_dim=32, n_heads=4, n_layers=2,
                drop_rate=0.0, qkv_bias=True)
TEXT = ("It had always been his fate to have women say such things of him: the fact "
        "should be set down in extenuation. ") * 2


def guide(model, ids, max_length, stride):
    """The loop of https://huggingface.co/docs/transformers/perplexity: (mean
    NLL, tokens scored). Each window's mean loss is weighted by the number of
    labels transformers really scored (those left after its one-token shift);
    the guide weights by that number minus one in every window, which is
    right only where a window's first label is among them (the first window)."""
    ids = torch.tensor(ids)[None]
    seq_len = ids.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        num_loss_tokens = (target_ids[:, 1:] != -100).sum().item()
        nll_sum += loss.double().item() * num_loss_tokens
        n_tokens += num_loss_tokens
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum / n_tokens, n_tokens


@pytest.mark.parametrize("stride", [32, 12, 5])
def test_equals_the_guide_on_transformers(stride):
    params = random_params(CFG, seed=1)
    ids = ByteTokenizer().encode(TEXT)
    assert len(ids) > 3 * CFG.context_length
    ours = sliding_window_perplexity(params, CFG, ids, stride=stride)
    loss, tokens = guide(hf_model(params, CFG), ids, CFG.context_length, stride)
    assert ours.tokens == tokens
    if stride < CFG.context_length:  # overlapping: every token but the first, once
        assert tokens == len(ids) - 1
    np.testing.assert_allclose(ours.loss, loss, rtol=0, atol=1e-4)
    assert ours.perplexity == pytest.approx(np.exp(loss), rel=1e-4)


def test_cli_writes_eval_json_and_refuses_a_bad_stride(tmp_path, capsys):
    params = random_params(CFG, seed=2)
    folder = tmp_path / "model"
    folder.mkdir()
    save_safetensors(params, CFG, folder / "model.safetensors")
    hf_config(CFG).save_pretrained(folder)
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT)
    argv = ["eval", "perplexity", "--hf", str(folder), "--tokenizer", "byte", "--data", str(text),
            "--stride", "16", "--out", str(tmp_path / "out")]
    assert main(argv) == 0
    record = json.loads((tmp_path / "out" / "eval.json").read_text())
    expected = sliding_window_perplexity(params, CFG, ByteTokenizer().encode(TEXT), stride=16)
    assert record["tokens"] == expected.tokens == len(TEXT) - 1
    assert record["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    assert f"over {expected.tokens} tokens" in capsys.readouterr().out
    assert main(argv[:-4] + ["--stride", "33"]) == 2
    assert "stride must be an int from 1 to the context length 32" in capsys.readouterr().err


def test_equals_the_guide_on_a_llama_folder(tmp_path):
    """The same on a Llama 3 folder (GQA, RoPE, RMSNorm) read by load_hf; the
    four windows batched three at a time (two batches, widths 64 and 32)."""
    from jaxllm.parity.families import hf_model as family_model

    model = family_model("llama")
    model.save_pretrained(tmp_path)
    params, config = load_hf(tmp_path)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, size=150)
    ours = sliding_window_perplexity(params, config, ids, stride=40, batch_size=3)
    loss, tokens = guide(model, ids.tolist(), config.context_length, 40)
    assert ours.tokens == tokens == len(ids) - 1 and ours.windows == 4
    np.testing.assert_allclose(ours.loss, loss, rtol=0, atol=1e-5)


def test_score_refuses_rows_it_cannot_score():
    params = random_params(CFG, seed=3)
    with pytest.raises(ValueError, match="row 0: 34 tokens"):
        score(params, CFG, [Scored(list(range(34)), 3)])
    with pytest.raises(ValueError, match="row 1: 5 tokens to score of 5"):
        score(params, CFG, [Scored([1, 2], 1), Scored([1, 2, 3, 4, 5], 5)])
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        score(params, CFG, [Scored([1, 2], 1)], batch_size=0)
