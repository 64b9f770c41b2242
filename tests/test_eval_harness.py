"""jaxllm as an lm-evaluation-harness model, against lm_eval's own `hf` model on
the same GPT-2 weights: a multiple-choice task defined here over a local JSON
file (offline), rolling log-likelihoods and generations."""

import json
import os
import shutil

os.environ["HF_DATASETS_OFFLINE"] = "1"  # before datasets loads: the task's data is local

import lm_eval  # noqa: E402  (the eval extra, in the test extra)
import pytest  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from jaxllm import cli  # noqa: E402
from jaxllm.config import GPTConfig  # noqa: E402
from jaxllm.eval.harness import JaxLLM  # noqa: E402
from jaxllm.hf import save_hf  # noqa: E402
from jaxllm.parity.reference import random_params  # noqa: E402

GPT2 = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=4, n_layers=2,
                 drop_rate=0.0, qkv_bias=True)
TEXT = ("It had always been his fate to have women about him. He was a painter of some "
        "repute, and his pictures sold; the dealers liked them, the critics praised them. ") * 6

QUESTIONS = [
    ("The capital of France is", ["Paris", "London", "a banana"], 0),
    ("Two plus two equals", ["four", "seven", "the sky"], 0),
    ("The opposite of hot is", ["purple", "cold", "Tuesday"], 1),
    ("A painter works with", ["paint", "engines", "the moon"], 0),
    ("Fish live in", ["trees", "the desert", "water"], 2),
    ("The sun rises in the", ["east", "basement", "soup"], 0),
]


@pytest.fixture(scope="module")
def gpt2_folder(shared_data, tmp_path_factory):
    """A tiny random GPT-2 (GPT-2's vocabulary) as a Hugging Face folder, its
    tokenizer files beside it, so lm_eval's hf model and jaxllm read the same."""
    folder = tmp_path_factory.mktemp("gpt2")
    save_hf(folder, random_params(GPT2, seed=0), GPT2)
    shutil.copy(shared_data / "encoder.json", folder / "vocab.json")
    shutil.copy(shared_data / "vocab.bpe", folder / "merges.txt")
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A folder with one multiple-choice task YAML over a local JSON file."""
    folder = tmp_path_factory.mktemp("tasks")
    with open(folder / "tiny.jsonl", "w") as f:
        for question, choices, answer in QUESTIONS:
            f.write(json.dumps({"question": question, "choices": choices, "answer": answer}) + "\n")
    (folder / "tiny_mc.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'tiny.jsonl'}
  cache_dir: {folder / 'cache'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    return folder


@pytest.fixture(scope="module")
def models(gpt2_folder):
    return (JaxLLM(hf=str(gpt2_folder), batch_size=4),
            HFLM(pretrained=str(gpt2_folder), device="cpu", dtype="float32", batch_size=4))


def _evaluate(model, task_dir, **kwargs):
    return lm_eval.simple_evaluate(model=model, tasks=["tiny_mc"], log_samples=True, **kwargs,
                                   task_manager=TaskManager(include_path=str(task_dir),
                                                              include_defaults=False))


def test_multiple_choice_equals_lm_evals_hf_model(gpt2_folder, models, task_dir):
    """Per-choice log-likelihoods to 1e-4 and the same accuracy (jaxllm by its
    registered name, as `lm_eval --model jaxllm` would make it)."""
    ours = _evaluate("jaxllm", task_dir, model_args=f"hf={gpt2_folder}", batch_size=4)
    theirs = _evaluate(models[1], task_dir)

    def loglikelihoods(result):
        samples = sorted(result["samples"]["tiny_mc"], key=lambda s: s["doc_id"])
        return [[resp[0][0] for resp in s["resps"]] for s in samples]

    a, b = loglikelihoods(ours), loglikelihoods(theirs)
    assert len(a) == len(QUESTIONS) and [len(x) for x in a] == [3] * len(QUESTIONS)
    assert max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb)) < 1e-4
    assert ours["results"]["tiny_mc"]["acc,none"] == theirs["results"]["tiny_mc"]["acc,none"]


def test_rolling_and_generation_equal_lm_evals_hf_model(models):
    """loglikelihood_rolling over texts longer than the context (several
    windows) to float32's rounding of the sum, and greedy generate_until to the same text."""
    ours, theirs = models
    texts = [TEXT, "Short text.", TEXT[:300]]
    rolling = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)]
    a, b = ours.loglikelihood_rolling(rolling), theirs.loglikelihood_rolling(rolling)
    assert len(ours.tok_encode(TEXT)) > 2 * ours.max_length
    # sums of ~450 float32 log-probabilities near -10 each: equal to float32's rounding
    assert a == pytest.approx(b, rel=1e-6, abs=1e-4)
    gen = [Instance("generate_until", {}, (c, {"until": ["\n\n"], "max_gen_toks": 8,
                                               "do_sample": False}), i)
           for i, c in enumerate(["It had always been", "The dealers", TEXT[:120]])]
    got, want = ours.generate_until(gen), theirs.generate_until(gen)
    assert got == want and all(got)


def test_cli_harness(gpt2_folder, task_dir, tmp_path, capsys):
    assert cli.main(["eval", "harness", "--hf", str(gpt2_folder), "--tasks", "tiny_mc",
                     "--include-path", str(task_dir), "--out", str(tmp_path)]) == 0
    assert "tiny_mc" in capsys.readouterr().out
    record = json.loads((tmp_path / "eval.json").read_text())
    assert 0 <= record["results"]["tiny_mc"]["acc,none"] <= 1
    assert cli.main(["eval", "harness", "--hf", str(gpt2_folder), "--tasks", "no_such_task",
                     "--include-path", str(task_dir)]) == 2
    assert "unknown task(s) no_such_task" in capsys.readouterr().err


def test_registered_as_lm_evals_jaxllm_model(gpt2_folder):
    """`lm_eval --model jaxllm --model_args hf=...` resolves to JaxLLM; an
    argument it does not take is named, not dropped."""
    from lm_eval.api.registry import get_model

    assert get_model("jaxllm") is JaxLLM
    model = JaxLLM.create_from_arg_string(f"hf={gpt2_folder},max_gen_toks=5",
                                          {"batch_size": 2, "device": "cpu"})
    assert (model.batch_size, model.max_gen_toks, model.max_length) == (2, 5, 64)
    with pytest.raises(ValueError, match="unknown model argument.s. pretrained"):
        JaxLLM.create_from_arg_string(f"pretrained={gpt2_folder}")


def test_lm_evals_own_command_line_with_jaxllm(gpt2_folder, task_dir, tmp_path):
    """`python -m jaxllm.eval.lm_eval_cli` is lm_eval's command line with
    `--model jaxllm` known: lm_eval's options pass through unchanged, and the
    accuracy it writes is the one simple_evaluate gives."""
    from jaxllm.eval.lm_eval_cli import main

    main(["--model", "jaxllm", "--model_args", f"hf={gpt2_folder}", "--tasks", "tiny_mc",
          "--include_path", str(task_dir), "--batch_size", "4", "--limit", "4",
          "--output_path", str(tmp_path)])
    written = json.loads(next(tmp_path.rglob("results_*.json")).read_text())
    ours = _evaluate("jaxllm", task_dir, model_args=f"hf={gpt2_folder}", batch_size=4, limit=4)
    assert written["config"]["model"] == "jaxllm" and written["config"]["limit"] == 4
    assert written["results"]["tiny_mc"]["acc,none"] == ours["results"]["tiny_mc"]["acc,none"]
