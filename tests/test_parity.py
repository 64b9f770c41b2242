"""jaxllm's GPT-2 against Hugging Face's `GPT2LMHeadModel` in PyTorch.

The checks live in `jaxllm.parity.gpt2` (the same functions `jaxllm parity`
reports); each test asserts on the comparisons they return: logits, loss,
gradient of every parameter, AdamW steps, weight decay, greedy tokens and the
weight conversion itself. Also the parity module's own contract: a failing
comparison fails, the report says so, and the command exits non-zero.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxllm import from_hf_state_dict
from jaxllm import parity
from jaxllm.cli import main as cli_main
from jaxllm.parity import assert_passed, close, exact, gpt2, relative, within

CPU_ATTN_IMPLS = gpt2.CPU_ATTN_IMPLS
TIE = pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
QKV_BIAS = pytest.mark.parametrize("qkv_bias", [True, False], ids=["qkv_bias", "no_qkv_bias"])


def quantities(comparisons):
    return [c.quantity for c in comparisons]


# -- logits --------------------------------------------------------------------
@TIE
@QKV_BIAS
def test_logits_match_transformers(tie, qkv_bias):
    comparisons = assert_passed(gpt2.logits(tie, qkv_bias))
    assert quantities(comparisons) == [f"logits ({impl} attention)" for impl in CPU_ATTN_IMPLS]
    assert all(c.tolerance == gpt2.LOGIT_ATOL for c in comparisons)


# -- loss and gradients --------------------------------------------------------
def assert_loss_and_gradients(comparisons):
    loss, grads = assert_passed(comparisons)
    assert loss.quantity.startswith("loss") and loss.tolerance == 1e-5
    assert grads.measure == "relative error" and grads.tolerance == gpt2.GRAD_RTOL


@TIE
@QKV_BIAS
def test_loss_and_every_gradient_match_torch_autograd(tie, qkv_bias):
    assert_loss_and_gradients(gpt2.gradients(tie, qkv_bias))


@pytest.mark.parametrize("impl", [i for i in CPU_ATTN_IMPLS if i != "reference"])
def test_gradients_of_each_attention_implementation(impl):
    assert_loss_and_gradients(gpt2.gradients(False, True, attn_impl=impl, seed=5))


@pytest.mark.skipif(platform.machine() != "x86_64", reason="Intel MKL is x86-64 only")
@pytest.mark.parametrize("matmul_impl", ["mkl", "xla"])
@TIE
def test_cpu_kernel_recipe_matches_torch(tie, matmul_impl):
    logits, *rest = gpt2.cpu_kernel_recipe(tie, matmul_impl)
    assert_passed([logits])
    assert logits.quantity == "logits (mkl attention)" and logits.tolerance == gpt2.LOGIT_ATOL
    assert_loss_and_gradients(rest)


def test_masked_loss_matches_ignore_index():
    loss, ignored, float_mask = assert_passed(gpt2.masked_loss())
    assert loss.tolerance == 1e-5 and ignored.rtol == 1e-6
    assert float_mask.tolerance == 0 and float_mask.difference == 0


# -- one optimizer, two frameworks -------------------------------------------
@TIE
def test_adamw_steps_match_torch(tie):
    rates, weights = assert_passed(gpt2.adamw_steps(tie))
    assert rates.rtol == 1e-6 and weights.tolerance == 1e-6
    assert weights.where.startswith("step ") or weights.difference == 0


def test_weight_decay_is_decoupled_and_masked():
    ours, torchs = assert_passed(gpt2.weight_decay())
    assert ours.rtol == torchs.rtol == 1e-6 and ours.tolerance == torchs.tolerance == 0


# -- weight conversion ---------------------------------------------------------
@TIE
@QKV_BIAS
def test_hf_round_trip_is_exact(tie, qkv_bias, tmp_path):
    comparisons = assert_passed(gpt2.hf_round_trip(tie, qkv_bias, tmp_path))
    assert len(comparisons) == 4 and all(c.tolerance == 0 for c in comparisons)


def test_missing_safetensors_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        from_hf_state_dict(tmp_path / "nothing.safetensors", gpt2.BASE)


# -- the comparisons themselves can fail ---------------------------------------
def test_comparisons_fail_past_their_tolerance_and_name_the_worst_entry():
    a = np.array([1.0, 2.0, 3.0])
    assert within("x", (a, a + 1e-6), 1e-5).passed
    c = within("x", {"p": (a, a), "q": (a, a + [0, 2e-5, 0])}, 1e-5)
    assert not c.passed and c.where == "q" and c.difference == pytest.approx(2e-5)
    assert within("x", {"p": (a, a), "q": (a, a)}, 1e-5).where == ""  # nothing differs
    assert not within("x", (np.nan, 1.0), 1.0).passed  # NaN never passes
    assert close("x", (a * (1 + 1e-7), a), atol=0, rtol=1e-6).passed
    assert not close("x", (a * (1 + 1e-5), a), atol=0, rtol=1e-6).passed
    assert not relative("x", (a * 1.1, a), 1e-5).passed and relative("x", (a, a), 1e-12).passed
    assert exact("x", (a, a)).passed and not exact("x", (a, np.nextafter(a, 4))).passed
    with pytest.raises(parity.CheckFailed, match="shape"):
        within("x", (a, a[:2]), 1.0)
    with pytest.raises(AssertionError, match=r"x: max abs diff 2e-05 at q"):
        assert_passed([c])
    with pytest.raises(AssertionError, match="compared nothing"):
        assert_passed([])


def _failing_check():
    return [within("a difference", (1.0, 1.5), 0.1)]


def _crashing_check():
    parity.require(False, "the steps learned nothing")


def _nan_check():
    return [within("a NaN", (float("nan"), 1.0), 1.0)]


def test_report_counts_failures_and_crashes(tmp_path):
    good = parity.Check("masked", gpt2.masked_loss, {})
    bad = parity.Check("bad", _failing_check, {})
    crash = parity.Check("crash", _crashing_check, {})
    nan = parity.Check("nan", _nan_check, {})
    outcomes = parity.run_checks([good, bad, crash, nan])
    assert [o.passed for o in outcomes] == [True, False, False, False]
    assert outcomes[2].error == "CheckFailed: the steps learned nothing"
    md, js = parity.write_report(outcomes, tmp_path)
    data = json.loads(js.read_text())
    assert data["passed"] is False
    assert [c["check"] for c in data["checks"]] == ["masked", "bad", "crash", "nan"]
    assert data["checks"][1]["comparisons"][0]["difference"] == 0.5
    assert data["checks"][3]["comparisons"][0]["difference"] == "nan"  # strict JSON
    text = md.read_text()
    assert "**1 of 4 checks passed.**" in text
    assert "| bad | a difference | max abs diff | 5.00e-01 | 1e-01 |  | **FAILED** |" in text


def test_every_registered_check_is_named_once_and_selectable():
    checks = parity.load_checks()
    areas = list(dict.fromkeys(c.area for c in checks.values()))  # in the report's order
    assert areas[:3] == ["basics", "gpt2", "families"] and {"finetune", "lora", "dpo"} <= set(areas)
    assert "gpt2: greedy tokens vs generate()" in checks
    assert [c.name for c in parity.select(["gpt2: greedy*"])] == [
        "gpt2: greedy tokens vs generate()"]
    assert len(parity.select(["greedy"])) == 3  # a word: every name containing it
    assert {c.area for c in parity.select(["basics"])} == {"basics"}
    with pytest.raises(ValueError, match="already registered"):
        parity.register("gpt2: masked loss")(_failing_check)


def test_cli_writes_the_report_and_exits_nonzero_on_a_failure(tmp_path, capsys, monkeypatch):
    out = tmp_path / "report"
    assert cli_main(["parity", "masked loss", "--out", str(out)]) == 0
    assert "1 of 1 checks passed" in capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    assert data["passed"] and data["checks"][0]["check"] == "gpt2: masked loss"
    assert "| gpt2: masked loss | masked loss vs ignore_index=-100 |" in (
        out / "results.md").read_text()

    monkeypatch.setitem(parity.CHECKS, "zz failing", parity.Check("zz failing", _failing_check, {}))
    assert cli_main(["parity", "zz failing", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "FAILED zz failing" in captured.out and "failed: zz failing" in captured.err
    assert json.loads((out / "results.json").read_text())["passed"] is False

    assert cli_main(["parity", "no such check"]) == 2
    assert "no check matches 'no such check'" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert cli_main(["parity", "masked loss", "--out", str(tmp_path / "file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_cli_without_torch_says_what_to_install():
    # A meta-path finder that refuses torch: the package imports, the checks cannot.
    code = ("import sys\n"
            "class NoTorch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('torch', 'transformers'):\n"
            "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
            "sys.meta_path.insert(0, NoTorch())\n"
            "from jaxllm.cli import main\n"
            "sys.exit(main(['parity', '--list']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "need PyTorch and transformers" in proc.stderr
    assert "pip install 'jaxllm[test]'" in proc.stderr
    assert "Traceback" not in proc.stderr
