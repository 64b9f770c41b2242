"""SIGINT and SIGTERM to the real `jaxllm` processes, at the moments that matter:
while JAX compiles, while tokens stream, while a run trains and while it saves.
Each stop is one line and exit code 130 (SIGINT) or 143 (SIGTERM); a training
run saves where it stopped and resumes to the losses of a run never stopped;
`jaxllm launch` passes SIGTERM on and leaves nothing behind."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import pytest

import jaxllm
from jaxllm.cli import main
from jaxllm.hf import hf_config_dict, save_safetensors
from jaxllm.train import checkpoint
from jaxllm.train.optim import TrainConfig
from jaxllm.train.step import init_train_state

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # the longest any process here may take (a loaded 2-core machine)
TINY = jaxllm.GPTConfig(vocab_size=257, context_length=32, emb_dim=32, n_heads=4, n_layers=2,
                        drop_rate=0.0, qkv_bias=True)
PRETRAIN = ["--set", "context_length=16", "--set", "emb_dim=16", "--set", "n_heads=2",
            "--set", "n_layers=1", "--set", "batch_size=4", "--set", "sample_tokens=2",
            "--set", "eval_batches=1", "--set", "log_every=1", "--set", "temperature=0",
            "--set", "warmup_steps=0", "--set", "min_lr_ratio=1",  # a constant learning rate
            "--eval-every", "100000", "--quiet"]


class Jaxllm:
    """`python -m jaxllm ARGS` with its output collected as it comes."""

    def __init__(self, args, *, stdin=None, env=None):
        env = dict(os.environ, PYTHONPATH=str(REPO), JAX_LOG_COMPILES="1", **(env or {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "jaxllm", *args], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        if stdin is not None:
            self.proc.stdin.write(stdin.encode())
            self.proc.stdin.flush()
        self.out, self.err = bytearray(), bytearray()
        self.readers = [threading.Thread(target=self._read, args=(s, b), daemon=True)
                        for s, b in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for r in self.readers:
            r.start()
        self.started = time.monotonic()

    @staticmethod
    def _read(stream, into):
        while chunk := stream.read1(4096):
            into.extend(chunk)

    def wait_for(self, what: str, ready) -> None:
        """Until `ready(self)`; fails if the process ends first or takes too long."""
        while not ready(self):
            if self.proc.poll() is not None or time.monotonic() - self.started > TIMEOUT:
                self.kill()
                pytest.fail(f"no {what} (exit {self.proc.returncode}):\n"
                            f"{self.err.decode(errors='replace')[-3000:]}")
            time.sleep(0.01)

    def stop(self, signum=signal.SIGINT) -> tuple[int, str, str]:
        """(exit code, stdout, stderr) after `signum`."""
        assert self.proc.poll() is None, "the process ended before the signal"
        os.kill(self.proc.pid, signum)
        try:
            code = self.proc.wait(timeout=90)
        finally:
            self.kill()
        for r in self.readers:
            r.join(timeout=10)
        return code, self.out.decode(errors="replace"), self.err.decode(errors="replace")

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def compiling(self, name: str):
        return lambda p: f"Compiling jit({name})".encode() in p.err


# "Finished tracing ...", "Compiling jit(...)", bare or through `logging` ("WARNING:jax...:")
JAX_COMPILE_LOG = re.compile(r"^(\w+:jax[\w.]*:)?(Finished |Compiling )")


def stop_line(stopped, command, signum=signal.SIGINT) -> str:
    """The one line a stop ends with, checked: exit code, no traceback, no crash."""
    code, _, err = stopped
    assert code == 128 + signum, err[-3000:]
    for crash in ("Traceback", "Segmentation fault", "Fatal Python error", "KeyboardInterrupt"):
        assert crash not in err, err[-3000:]
    # JAX_LOG_COMPILES lines come from XLA's threads and may land after the stop line
    lines = [line for line in err.splitlines()
             if line.strip() and not JAX_COMPILE_LOG.match(line)]
    name = signal.Signals(signum).name
    assert lines[-1].startswith(f"jaxllm {command}: stopped by {name}"), err[-3000:]
    assert sum(line.startswith(f"jaxllm {command}: stopped") for line in lines) == 1
    return lines[-1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny GPT-2 in Hugging Face format (byte vocabulary)."""
    d = tmp_path_factory.mktemp("tiny_gpt2")
    save_safetensors(jaxllm.init_params(TINY, jax.random.PRNGKey(0)), TINY,
                     d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(hf_config_dict(TINY)))  # as save_hf writes it
    return d


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A run folder `jaxllm chat` reads: an instruction run's checkpoint (untrained)."""
    run = tmp_path_factory.mktemp("chat") / "run"
    params = jaxllm.init_params(TINY, jax.random.PRNGKey(1))
    checkpoint.save(checkpoint.open_manager(run, create=True),
                    init_train_state(params, TrainConfig()),
                    {"model": TINY.to_dict(), "tokenizer": "byte", "kind": "instruct",
                     "instruct": {"style": "alpaca"}})
    return run


GENERATE = ["generate", "--tokenizer", "byte", "--prompt", "Hi", "--max-new-tokens", "20000",
            "--ignore-eos"]


def test_generate_stops_in_one_line_while_compiling(model_dir):
    p = Jaxllm([*GENERATE, "--hf", str(model_dir)])
    p.wait_for("first compilation of the decoder", p.compiling("_prefill"))
    stop_line(p.stop(), "generate")


def test_generate_stops_in_one_line_while_decoding_and_keeps_its_text(model_dir):
    p = Jaxllm([*GENERATE, "--hf", str(model_dir)])
    p.wait_for("streamed tokens", lambda p: len(p.out) > 20)
    stopped = p.stop()
    stop_line(stopped, "generate")
    # what was streamed is flushed, not lost (counted in bytes: random tokens are
    # not all valid UTF-8, and replacement characters shorten the decoded text)
    assert stopped[1].startswith("Hi") and len(p.out) > 20


def test_chat_stops_in_one_line_while_compiling_and_while_answering(chat_run):
    p = Jaxllm(["chat", "--run-dir", str(chat_run), "--max-new-tokens", "20000"],
               stdin="Name a color.\n")
    p.wait_for("first compilation of the decoder", p.compiling("_prefill"))
    stop_line(p.stop(), "chat")

    p = Jaxllm(["chat", "--run-dir", str(chat_run), "--max-new-tokens", "20000"],
               stdin="Name a color.\n")
    p.wait_for("an answer streaming", lambda p: len(p.out) > 5)
    stop_line(p.stop(signal.SIGTERM), "chat", signal.SIGTERM)  # a scheduler's stop


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    text = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    text.write_text("the cat sat on the mat. " * 400)
    return text


def pretrain(corpus, out, *extra):
    return ["pretrain", "--data", str(corpus), "--out", str(out), *PRETRAIN, *extra]


def train_losses(run):
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


def saved_step(line: str, run) -> int:
    m = re.search(r"at step (\d+); saved checkpoint (\d+) in (\S+) \(continue with --resume\)",
                  line)
    assert m and m[1] == m[2] and m[3] == str(Path(run).absolute() / "checkpoints"), line
    return int(m[2])


def test_pretrain_stopped_while_compiling_saves_and_resumes_bitwise(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    p = Jaxllm(pretrain(corpus, run, "--steps", "100000", "--save-every", "100000"))
    p.wait_for("compilation of the train step", p.compiling("train_step"))
    step = saved_step(stop_line(p.stop(), "pretrain"), run)
    assert step == 1  # the step being compiled finishes, is saved, and the run stops
    assert checkpoint.open_manager(run).all_steps() == [1]

    # resumed (in this process, so that the run never stopped reuses its compiled steps)
    total = str(step + 3)
    assert main(pretrain(corpus, run, "--steps", total, "--save-every", "100000",
                         "--resume")) == 0
    assert f"resuming {run} from step 1" in capsys.readouterr().err
    ref = tmp_path / "ref"  # the same run, never stopped
    assert main(pretrain(corpus, ref, "--steps", total, "--save-every", "100000")) == 0
    capsys.readouterr()
    assert train_losses(run) == train_losses(ref) and len(train_losses(ref)) == step + 3


def test_pretrain_stopped_while_saving_keeps_that_checkpoint(corpus, tmp_path):
    run = tmp_path / "run"
    p = Jaxllm(pretrain(corpus, run, "--steps", "100000", "--save-every", "3"))
    saving, written = run / "checkpoints", []

    def writing(p) -> bool:  # Orbax writes a step to <step>.orbax-checkpoint-tmp-*, then renames
        written[:] = [int(e.name.split(".")[0]) for e in (
            saving.iterdir() if saving.is_dir() else ()) if "tmp" in e.name]
        return bool(written)

    p.wait_for("a checkpoint being written", writing)
    step = saved_step(stop_line(p.stop(), "pretrain"), run)
    # the save under way completes; the run stops at the next step boundary, saving there
    assert step in (written[0], written[0] + 1)
    assert written[0] in checkpoint.open_manager(run).all_steps()
    assert checkpoint.newest_intact(run, fallback=False) == step
    assert max(s for s, _ in train_losses(run)) == step
    params, config, _ = checkpoint.load_params(run)
    assert config.emb_dim == 16 and params["blocks"]


def test_finetune_classify_stopped_while_training_saves_where_it_stopped(tmp_path):
    data = tmp_path / "spam.tsv"
    data.write_text("".join(f"{'spam' if i % 2 else 'ham'}\tmessage number {i} "
                            f"{'win cash' if i % 2 else 'see you'}\n" for i in range(60)))
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(dict(vocab_size=257, context_length=32, emb_dim=16, n_heads=2,
                                      n_layers=1, drop_rate=0.0)))
    run = tmp_path / "clf"
    p = Jaxllm(["finetune", "classify", "--init", "random", "--config", str(config),
                "--tokenizer", "byte", "--data", str(data), "--out", str(run), "--quiet",
                "--steps", "100000", "--set", "batch_size=4", "--set", "log_every=1",
                "--set", "eval_every=100000", "--set", "save_every=100000"])
    p.wait_for("training steps", lambda p: (run / "metrics.jsonl").is_file() and len(
        train_losses(run)) >= 2)
    step = saved_step(stop_line(p.stop(), "finetune classify"), run)
    assert step >= 2 and checkpoint.open_manager(run).all_steps() == [step]
    assert max(s for s, _ in train_losses(run)) == step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_to_launch_stops_every_process_after_a_checkpoint(corpus, tmp_path):
    run, port = tmp_path / "run", free_port()
    args = ["launch", "--processes", "2", "--devices-per-process", "2", "--port", str(port),
            "--", *pretrain(corpus, run, "--steps", "100000", "--save-every", "2",
                            "--mesh", "fsdp=4")]
    p = Jaxllm(args, env={"XLA_FLAGS": ""})
    p.wait_for("checkpoint 2", lambda p: (run / "checkpoints" / "2").is_dir())
    pids = [int(m) for m in re.findall(rb"jaxllm launch: process \d is pid (\d+)", p.err)]
    sent = time.monotonic()
    stopped = p.stop(signal.SIGTERM)
    assert time.monotonic() - sent < 60
    line = stop_line(stopped, "launch", signal.SIGTERM)
    err = stopped[2]
    assert "passed on to the 2 processes" in line
    stops = [saved_step(s, run) for s in err.splitlines() if s.startswith("jaxllm pretrain:")]
    assert len(stops) == 2 and stops[0] == stops[1] >= 2  # both saved one agreed step
    for pid in pids:  # the children are gone, not orphaned and training
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    with socket.socket() as s:  # the coordinator's port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    assert checkpoint.newest_intact(run, fallback=False) == stops[0]
    params, config, _ = checkpoint.load_params(run)
    assert config.emb_dim == 16 and params["blocks"]


def test_importing_jaxllm_as_a_library_leaves_signals_alone():
    """Only the `jaxllm` command takes SIGINT and SIGTERM over; this pytest process
    imported jaxllm and keeps Python's own handling (KeyboardInterrupt)."""
    from jaxllm import interrupt

    assert not interrupt.is_command() and not interrupt._installed
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert main(["generate", "--hf", "/nonexistent", "--tokenizer", "byte"]) == 2  # main too
    assert not interrupt._installed
