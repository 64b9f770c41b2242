"""Instruction fine-tuning: the collate rule, the masked loss and AdamW steps
against PyTorch, the shared data set's split and prompt, reading errors, and
the command line end to end on a tiny model."""

from __future__ import annotations

import argparse
import http.server
import io
import json
import socket
import threading
import time

import jax
import numpy as np
import pytest
import torch

from jaxllm.cli import chat, finetune_instruct as cli
from jaxllm.config import GPTConfig
from jaxllm.data.instructions import (Example, InstructionBatches, collate, read_instructions,
                                      split_instructions, tokenize_entries)
from jaxllm.finetune.instruct import format_prompt
from jaxllm.finetune.instruct_run import InstructConfig, finetune_instruct
from jaxllm.finetune.judge import JudgeUnavailable, judge_responses, parse_score
from jaxllm.hf import hf_config_dict, to_hf_state_dict
from jaxllm.parity import assert_passed
from jaxllm.parity.finetune import instruct_gradients, instruct_steps
from jaxllm.parity.reference import random_params
from jaxllm.tokenizer import get_tokenizer
from jaxllm.train import TrainConfig, init_train_state

E = 50256
TINY = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2,
                 drop_rate=0.0, qkv_bias=True, tie_embeddings=False)


# -- the collate -----------------------------------------------------------------
HAND = [Example(np.array([1, 2, 3], np.int32), 2), Example(np.array([4, 5], np.int32), 1),
        Example(np.array([6, 7, 8, 9, 10], np.int32), 3)]


def test_collate_pads_shifts_and_keeps_the_first_end_of_text():
    b = collate(HAND)
    np.testing.assert_array_equal(b["tokens"], [[1, 2, 3, E, E], [4, 5, E, E, E],
                                                [6, 7, 8, 9, 10]])
    np.testing.assert_array_equal(b["targets"], [[2, 3, E, -100, -100], [5, E, -100, -100, -100],
                                                 [7, 8, 9, 10, E]])
    assert b["tokens"].dtype == b["targets"].dtype == np.int32


def test_collate_masks_the_prompt_and_truncates():
    masked = collate(HAND, mask_prompt=True)["targets"]
    # row 0: prompt [1, 2] -> the target predicting 2 is masked; row 1: prompt [4] masks nothing
    np.testing.assert_array_equal(masked, [[-100, 3, E, -100, -100], [5, E, -100, -100, -100],
                                           [-100, -100, 9, 10, E]])
    cut = collate(HAND, allowed_max_length=3)
    np.testing.assert_array_equal(cut["tokens"], [[1, 2, 3], [4, 5, E], [6, 7, 8]])
    np.testing.assert_array_equal(cut["targets"], [[2, 3, E], [5, E, -100], [7, 8, 9]])
    wide = collate(HAND, pad_multiple=4)
    assert wide["tokens"].shape == (3, 8)
    assert (wide["targets"][:, 5:] == -100).all() and (wide["tokens"][:, 5:] == E).all()


def book_collate(seqs, allowed):
    """The published rule written out by value: pad with end-of-text, shift,
    then every end-of-text in the targets after the first becomes -100."""
    longest = max(len(s) + 1 for s in seqs)
    inputs, targets = [], []
    for s in seqs:
        padded = list(s) + [E] + [E] * (longest - len(s) - 1)
        x, y = np.array(padded[:-1]), np.array(padded[1:])
        pads = np.nonzero(y == E)[0]
        if len(pads) > 1:
            y[pads[1:]] = -100
        inputs.append(x[:allowed])
        targets.append(y[:allowed])
    return np.stack(inputs), np.stack(targets)


def test_collate_equals_the_published_rule_on_random_batches():
    rng = np.random.default_rng(0)
    for trial in range(20):
        seqs = [rng.integers(0, E, rng.integers(1, 30)) for _ in range(rng.integers(1, 6))]
        allowed = int(rng.integers(5, 40))
        b = collate([Example(s.astype(np.int32), 0) for s in seqs], allowed_max_length=allowed)
        x, y = book_collate(seqs, allowed)
        np.testing.assert_array_equal(b["tokens"], x)
        np.testing.assert_array_equal(b["targets"], y)


def test_bucketing_keeps_epochs_permutations_and_pads_less():
    rng = np.random.default_rng(1)
    examples = [Example(np.ones(int(n), np.int32), 0) for n in rng.integers(2, 200, 96)]
    plain = InstructionBatches(examples, 4, seed=3)
    bucketed = InstructionBatches(examples, 4, seed=3, bucket=True, bucket_window=6)
    for batches in (plain, bucketed):
        for epoch in (0, 1):
            idx = np.concatenate(batches.epoch_batches(epoch))
            assert sorted(idx) == list(range(96))
    assert not np.array_equal(bucketed.indices_at(0), bucketed.indices_at(24))  # epochs differ
    np.testing.assert_array_equal(  # a function of the batch number
        InstructionBatches(examples, 4, seed=3, bucket=True, bucket_window=6).indices_at(30),
        bucketed.indices_at(30))

    def padding(batches):
        return sum(int((batches.batch_at(k)["targets"] == -100).sum()) for k in range(24))

    assert padding(bucketed) < 0.5 * padding(plain)


# -- the masked loss, its gradients and AdamW steps against torch ------------------
# The checks are the parity module's (`jaxllm parity` reports the same figures).
@pytest.mark.parametrize("mask_prompt", [False, True], ids=["prompt_kept", "prompt_masked"])
def test_masked_loss_and_gradients_equal_torch_ignore_index(mask_prompt):
    # the micro-batches count different numbers of targets, and a mean of their
    # means would be wrong (the check requires both): the loss and every gradient
    # within 1e-6 of torch's over the whole batch, every counted target counted
    loss, count, grads = assert_passed(instruct_gradients(mask_prompt))
    assert loss.tolerance == grads.tolerance == 1e-6 and count.difference == 0


def test_adamw_fine_tuning_steps_give_torch_losses():
    # six steps, one and a half epochs; the check requires the loss to fall by 0.1
    (losses,) = assert_passed(instruct_steps())
    assert losses.tolerance == 1e-5 and losses.rtol == 0


# -- the shared data set -------------------------------------------------------
ENTRY0_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nEvaluate the following phrase by transforming "
    "it into the spelling given.\n\n### Input:\nfreind --> friend\n\n### Response:\n")


def test_split_and_prompt_of_the_shared_file(shared_data):
    entries = read_instructions(shared_data / "instruction-data.json")
    train, test, val = split_instructions(entries)
    assert (len(entries), len(train), len(test), len(val)) == (1100, 935, 110, 55)
    assert test[0] is entries[935] and val[0] is entries[1045]
    assert format_prompt(entries[0]) == ENTRY0_PROMPT
    assert format_prompt(entries[0], "chat") == (
        "<|user|>\nEvaluate the following phrase by transforming it into the spelling given."
        "\n\nfreind --> friend\n<|assistant|>\n")
    assert "### Input" not in format_prompt(entries[5])  # entry 5 has no input
    tokenizer = get_tokenizer("gpt2", shared_data)
    for style in ("alpaca", "chat"):
        examples = tokenize_entries(entries, tokenizer, style)
        # prompt and response encoded apart are the tokens of the whole text
        for e, x in zip(entries, examples):
            whole = tokenizer.encode(format_prompt(e, style) + e["output"])
            assert x.tokens.tolist() == whole
            assert x.prompt_length == len(tokenizer.encode(format_prompt(e, style)))


def test_reading_errors_name_what_is_wrong(tmp_path):
    def write(name, content: bytes):
        p = tmp_path / name
        p.write_bytes(content)
        return p

    good = {"instruction": "Say hi.", "input": "", "output": "Hi."}
    assert read_instructions(write("ok.jsonl", (json.dumps(good) + "\n\n" + json.dumps(
        {"instruction": "a", "output": "b"}) + "\n").encode()))[1] == \
        {"instruction": "a", "input": "", "output": "b"}
    cases = [
        ("missing.json", json.dumps([good, {"instruction": "x", "input": ""}]).encode(),
         r"entry 1 has no 'output' key"),
        ("object.json", json.dumps({"data": [good]}).encode(), r"holds a JSON dict; .* list"),
        ("utf8.json", b'[{"instruction": "caf\xe9", "output": "x"}]', r"not valid UTF-8: byte 21"),
        ("number.json", json.dumps([dict(good, output=3)]).encode(), r"'output' must be a string"),
        ("line.jsonl", (json.dumps(good) + "\n{oops\n").encode(), r"line 2 is not JSON"),
        ("list.json", json.dumps(["text"]).encode(), r"entry 0 is a JSON str"),
        ("lines.json", (json.dumps(good) + "\n" + json.dumps(good)).encode(), r"\.jsonl suffix"),
    ]
    for name, content, message in cases:
        with pytest.raises(ValueError, match=message):
            read_instructions(write(name, content))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_instructions(tmp_path / "nothing.json")
    with pytest.raises(ValueError, match=r"is a folder, not a file"):
        read_instructions(tmp_path)
    for name, content in (("zero.json", b""), ("blank.json", b" \n\t\n"),
                          ("blank.jsonl", b"\n\n"), ("bom.json", b"\xef\xbb\xbf\n")):
        with pytest.raises(ValueError, match=rf"{name} is empty$"):
            read_instructions(write(name, content))


# -- the command line and the loop, end to end -------------------------------------
def run_cli(module, argv) -> int:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def test_cli_fine_tunes_answers_resumes_and_chats(shared_data, tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(dict(vocab_size=257, context_length=512, emb_dim=32, n_heads=4,
                                      n_layers=2, drop_rate=0.0, attn_impl="reference")))
    data = shared_data / "instruction-data.json"
    out = tmp_path / "run"
    argv = ["--init", "random", "--config", str(config), "--data", str(data), "--limit", "80",
            "--steps", "4", "--eval-every", "2", "--max-new-tokens", "12", "--set", "lr=3e-3",
            "--set", "batch_size=4", "--set", "sample_count=4", "--set", "sample_tokens=6",
            "--set", "pad_multiple=512", "--set", "response_batch=4",
            "--mask-prompt", "--bucket", "--out", str(out), "--quiet",
            "--judge-url", f"http://127.0.0.1:{closed_port()}"]
    assert run_cli(cli, argv) == 0
    captured = capsys.readouterr()
    assert "responses: 8 test entries" in captured.out
    assert "cannot be reached" in captured.err and "every other result are kept" in captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps"], summary["train_entries"], summary["test_entries"]) == (4, 68, 8)
    assert "cannot be reached" in summary["judge"]["error"]
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    responses = json.loads((out / "responses.json").read_text())
    entries = read_instructions(data)
    assert [r["instruction"] for r in responses] == [e["instruction"] for e in entries[68:76]]
    assert all(isinstance(r["model_response"], str) for r in responses)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 2, 4]
    assert all(len(r["samples"]) == 4 for r in records if r["kind"] == "eval")
    assert (out / "loss.png").stat().st_size > 0 and (out / "checkpoints" / "4").is_dir()

    # a second start on the same folder is refused
    assert run_cli(cli, argv) == 2
    assert "already holds checkpoints" in capsys.readouterr().err

    # interrupted at step 2 and resumed: the losses of the uninterrupted run
    tok = get_tokenizer("byte")
    tiny = GPTConfig.from_json(config)
    ic = InstructConfig(mask_prompt=True, bucket=True, eval_every=2, sample_count=0,
                        responses=False, pad_multiple=512)
    tc = TrainConfig.torch_adamw(**{**cli.PROTOCOLS["default"], "lr": 3e-3, "batch_size": 4,
                                    "total_steps": 4})
    part = tmp_path / "part"
    finetune_instruct(part, tiny, tc, ic, tok, entries[:80], progress=False, stop_at=2)
    finetune_instruct(part, tiny, tc, ic, tok, entries[:80], progress=False, resume=True)
    losses = [[r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
               if r["kind"] == "train"] for d in (out, part)]
    assert losses[0] == losses[1] and len(losses[0]) == 4

    assert run_cli(chat, ["--run-dir", str(out), "--prompt", "Name a color.",
                          "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    with pytest.raises(SystemExit):
        run_cli(cli, ["--data", str(data)])  # a starting point is required


def save_fake_run(run_dir, params, config, **meta):
    """A checkpoint as the fine-tuning commands write one, without training."""
    from jaxllm.train import checkpoint

    checkpoint.save(checkpoint.open_manager(run_dir, create=True),
                    init_train_state(params, TrainConfig()),
                    {"model": config.to_dict(), "tokenizer": "byte", **meta})
    return run_dir


def test_chat_reads_prompts_from_stdin_until_quit_and_refuses_a_classifier(
        tmp_path, capsys, monkeypatch):
    config = TINY.replace(vocab_size=257, context_length=128)
    params = random_params(config, 8)
    run = save_fake_run(tmp_path / "run", params, config, kind="instruct",
                        instruct={"style": "chat"})
    opts = ["--run-dir", str(run), "--max-new-tokens", "4"]
    alone = []
    for prompt in ("Hi.", "Add 2 and 2."):  # each answered on its own, as --prompt does
        assert run_cli(chat, [*opts, "--prompt", prompt]) == 0
        alone.append(capsys.readouterr().out)
    assert alone[0] != alone[1] and all(a.endswith("\n") for a in alone)

    asked = []
    real_answer = chat.answer

    def spy(params, config, tokenizer, instruction, style, args, out):
        asked.append((instruction, style))
        return real_answer(params, config, tokenizer, instruction, style, args, out)

    monkeypatch.setattr(chat, "answer", spy)
    for stdin, answered in (("Hi.\n  Add 2 and 2.  \n/quit\nnever asked\n", 2),
                            ("Hi.\n\nnever asked\n", 1),  # an empty line ends too
                            ("Hi.\nAdd 2 and 2.", 2)):  # and the end of input
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        asked.clear()
        assert run_cli(chat, opts) == 0
        assert asked == [("Hi.", "chat"), ("Add 2 and 2.", "chat")][:answered]
        assert capsys.readouterr().out == "".join(alone[:answered])

    clf = save_fake_run(tmp_path / "clf", params, config, kind="classify")
    monkeypatch.setattr("sys.stdin", io.StringIO("Hi.\n"))
    asked.clear()
    assert run_cli(chat, ["--run-dir", str(clf)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and asked == []
    err = captured.err.strip()
    assert "\n" not in err and f"{clf} is a classifier" in err
    assert "class head" in err and f"jaxllm classify --run-dir {clf}" in err


def test_batched_responses_equal_one_at_a_time():
    from jaxllm.finetune.instruct import generate_responses

    config = TINY.replace(vocab_size=257, context_length=256)
    params = random_params(config, 9)
    tok = get_tokenizer("byte")
    entries = [{"instruction": "Hi.", "input": "", "output": ""},
               {"instruction": "Name three primary colors.", "input": "", "output": ""},
               {"instruction": "Add.", "input": "2 + 2", "output": ""},
               {"instruction": "Spell it.", "input": "freind", "output": ""},
               {"instruction": "Rewrite the sentence in the passive voice.",
                "input": "The cat chased the mouse.", "output": ""},
               {"instruction": "Why?", "input": "", "output": ""}]
    prompts = [len(tok.encode(format_prompt(e))) for e in entries]
    assert len(set(prompts)) == len(entries)  # rows of a batch are padded differently
    kw = dict(max_new_tokens=12)
    batched, stats = generate_responses(params, config, tok, entries, batch_size=4, **kw)
    alone, _ = generate_responses(params, config, tok, entries, batch_size=1, **kw)
    assert batched == alone and stats["entries"] == 6
    assert len(set(alone)) > 1 and stats["new_tokens"] > 0  # real, different responses


# -- the judge client against a small local server ----------------------------------
class JudgeHandler(http.server.BaseHTTPRequestHandler):
    """Answers as the model named in the request says: "good" scores, "slow"
    sleeps, "broken" sends no JSON, "chatty" sends no number."""

    def do_POST(self):  # noqa: N802 (the http.server name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        model = body["model"]
        self.server.requests.append((self.path, body))
        if model == "slow":
            time.sleep(1.0)
        content = {"good": "Score: 85 (out of 100)", "slow": "50",
                   "chatty": "A fine answer."}.get(model, "")
        if self.path == "/v1/chat/completions":
            reply = {"choices": [{"message": {"role": "assistant", "content": content}}]}
        else:
            reply = {"message": {"role": "assistant", "content": content}, "done": True}
        data = b"<html>oops" if model == "broken" else json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (slow)
            pass

    def log_message(self, *args):
        pass


def test_cli_starts_from_a_pytorch_bin_folder_and_refuses_a_classifier(tmp_path, capsys):
    from jaxllm.train import checkpoint

    config = TINY.replace(vocab_size=257, context_length=256)
    params = random_params(config, 7)
    hf = tmp_path / "gpt2"
    hf.mkdir()
    torch.save({k: torch.from_numpy(v.copy()) for k, v in to_hf_state_dict(params, config).items()},
               hf / "pytorch_model.bin")
    (hf / "config.json").write_text(json.dumps(hf_config_dict(config)))
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": str(i)}
                                for i in range(24)]))
    common = ["--data", str(data), "--tokenizer", "byte", "--steps", "1", "--no-responses",
              "--set", "batch_size=4", "--set", "sample_count=0", "--set", "eval_batches=1",
              "--quiet"]
    assert run_cli(cli, ["--hf", str(hf), *common, "--out", str(tmp_path / "a")]) == 0
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["source"] == f"hf:{hf}" and summary["trainable_params"] == sum(
        int(x.size) for x in jax.tree.leaves(params))
    assert run_cli(cli, ["--hf", str(tmp_path / "nothing"), *common]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert run_cli(cli, ["--run-dir", str(tmp_path / "a"), *common, "--set", "n_layers=3",
                         "--out", str(tmp_path / "deeper")]) == 2
    assert "do not match the model config: no blocks/2/norm1/scale" in capsys.readouterr().err
    (hf / "config.json").unlink()
    assert run_cli(cli, ["--hf", str(hf / "pytorch_model.bin"), *common]) == 2
    assert "no config.json beside the weights" in capsys.readouterr().err

    clf = tmp_path / "clf"  # a classification run's checkpoint: its LM head is gone
    checkpoint.save(checkpoint.open_manager(clf, create=True),
                    init_train_state(params, TrainConfig()),
                    {"model": config.to_dict(), "tokenizer": "byte", "kind": "classify"})
    assert run_cli(cli, ["--run-dir", str(clf), *common, "--out", str(tmp_path / "b")]) == 2
    assert "is a classifier" in capsys.readouterr().err


@pytest.fixture
def judge_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), JudgeHandler)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ANSWERED = [{"instruction": "Name a color.", "input": "", "output": "Blue.",
             "model_response": "Red."},
            {"instruction": "Add.", "input": "2 + 2", "output": "4", "model_response": "4"}]


def test_judge_speaks_ollama_and_openai_and_survives_bad_answers(judge_server):
    base = f"http://127.0.0.1:{judge_server.server_address[1]}"
    for url, path in ((base, "/api/chat"), (base + "/v1", "/v1/chat/completions")):
        result = judge_responses(ANSWERED, url, "good", timeout=5)
        assert [s["score"] for s in result["scores"]] == [85, 85] and result["mean"] == 85
        sent_path, body = judge_server.requests[-1]
        assert sent_path == path and body["model"] == "good"
        assert "`4`" in body["messages"][0]["content"] and "### Input:\n2 + 2" in \
            body["messages"][0]["content"]
    assert judge_server.requests[0][1]["stream"] is False  # Ollama: one JSON answer

    for model, message in (("slow", "did not answer within 0.3 s"),
                           ("broken", "not ollama chat JSON"), ("chatty", "no score")):
        result = judge_responses(ANSWERED, base, model, timeout=0.3)
        assert result["mean"] is None and result["failed"] == 2
        assert all(message in s["error"] for s in result["scores"]), result["scores"]
    with pytest.raises(JudgeUnavailable, match="failed 3 entries in a row"):
        judge_responses(ANSWERED * 2, base, "chatty", timeout=5)
    with pytest.raises(JudgeUnavailable, match="cannot be reached"):
        judge_responses(ANSWERED, f"http://127.0.0.1:{closed_port()}", "good", timeout=5)
    with pytest.raises(ValueError, match="must be http"):
        judge_responses(ANSWERED, "localhost:11434", "good")
    assert [parse_score(t) for t in ("85", "Score: 7", "150 then 40", "3.5", "none")] == \
        [85, 7, 40, None, None]


class RawReply(threading.Thread):
    """A TCP server that answers every connection with `reply` bytes, `every`
    seconds apart when `every` is set (a server that trickles), then closes."""

    def __init__(self, reply: bytes, every: float | None = None):
        super().__init__(daemon=True)
        self.reply, self.every = reply, every
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.start()

    def run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    def answer(self, conn):
        with conn:
            try:
                conn.recv(65536)
                if self.every is None:
                    conn.sendall(self.reply)
                for byte in ([] if self.every is None else self.reply):
                    conn.sendall(bytes([byte]))
                    time.sleep(self.every)
            except OSError:  # the client gave up
                pass


def test_a_trickling_or_non_http_judge_costs_each_entry_one_line(tmp_path, capsys):
    from jaxllm.finetune.instruct_run import _judge

    trickle = RawReply(b"HTTP/1.0 200 OK\r\nContent-Length: 100\r\n\r\n" + b"7" * 100, every=0.1)
    start = time.perf_counter()
    result = judge_responses(ANSWERED, trickle.url, "good", timeout=0.5)
    assert time.perf_counter() - start < 2.5  # a deadline per request, not per read
    assert result["failed"] == 2 and all("did not answer within 0.5 s" in s["error"]
                                         for s in result["scores"])
    ssh = RawReply(b"SSH-2.0-OpenSSH_9.6\r\n")
    out = [dict(e) for e in ANSWERED]
    judged = _judge(out, {"url": ssh.url, "model": "good", "timeout": 5}, "alpaca", tmp_path)
    assert judged["failed"] == 2 and judged["mean"] is None
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"judge: test entry {i}: the judge at ")
                                   and "answered something that is not HTTP" in line
                                   for i, line in enumerate(lines))
    saved = json.loads((tmp_path / "responses.json").read_text())
    assert [r["judge_score"] for r in saved] == [None, None] and "not HTTP" in \
        saved[0]["judge_error"]
    for server in (trickle, ssh):
        server.sock.close()


@pytest.mark.parametrize("timeout", ["-1", "0", "nan"])
def test_a_bad_judge_timeout_is_refused_before_training(tmp_path, capsys, timeout):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": f"Say {i}.", "input": "", "output": str(i)}
                                for i in range(24)]))
    argv = ["--init", "random", "--preset", "small", "--tokenizer", "byte", "--data", str(data),
            "--judge-url", "http://127.0.0.1:11434", "--judge-timeout", timeout,
            "--out", str(tmp_path / "run")]
    assert run_cli(cli, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the judge's timeout must be a positive number of seconds" \
        in err
    assert not (tmp_path / "run").exists()


def test_entries_longer_than_the_context_are_warned_of(tmp_path):
    entries = [{"instruction": f"Say {i}.", "input": "", "output": "ab" * (100 if i < 3 else 1)}
               for i in range(20)]
    config = TINY.replace(vocab_size=257, context_length=256)
    tc = TrainConfig(batch_size=32, total_steps=1)  # more than the 17 training entries: the
    ic = InstructConfig(responses=False)              # run stops right after the data's checks
    with pytest.warns(UserWarning, match=r"data: 3 entries longer than 256 tokens were "
                                         r"truncated \(train 3, validation 0, test 0\)"):
        with pytest.raises(ValueError, match="fewer than one batch"):
            finetune_instruct(tmp_path / "run", config, tc, ic, get_tokenizer("byte"), entries,
                              progress=False, data_name="data")
