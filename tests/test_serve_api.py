"""`jaxllm serve` as a real process on a free 127.0.0.1 port, called with the
official `openai` client: completions, chat, streaming, errors, a client that
goes away, and 64 requests from 16 concurrent clients, each greedy answer
equal to `jaxllm.generate` for its prompt alone."""

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import jax
import openai
import pytest
import transformers

import jaxllm
from jaxllm.finetune.instruct import format_prompt
from jaxllm.generate import generate
from jaxllm.hf import hf_config_kwargs, save_safetensors
from jaxllm.tokenizer import ByteTokenizer

CFG = jaxllm.GPTConfig(vocab_size=257, context_length=256, emb_dim=32, n_heads=4, n_layers=2,
                       drop_rate=0.0, qkv_bias=True, tie_embeddings=True)
TOK = ByteTokenizer()
KEY = "sk-test-key"
NAME = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(argv, port, timeout=120.0):
    """A `jaxllm serve` process, once its /health answers (bounded)."""
    proc = subprocess.Popen([sys.executable, "-m", "jaxllm", "serve", *argv, "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"jaxllm serve exited {proc.returncode}: {proc.stdout.read()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"jaxllm serve did not answer within {timeout:g} s: {proc.stdout.read()}")


def stop_server(proc):
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=15)


@pytest.fixture(scope="module")
def params():
    return jaxllm.init_params(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def server(tmp_path_factory, params):
    d = tmp_path_factory.mktemp("served")
    save_safetensors(params, CFG, d / "model.safetensors")
    transformers.GPT2Config(**hf_config_kwargs(CFG)).save_pretrained(d)
    port = free_port()
    proc = start_server(["--hf", str(d), "--tokenizer", "byte", "--slots", "4",
                         "--model-name", NAME, "--api-key", KEY, "--no-warmup"], port)
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, timeout=30.0, max_retries=0)


def alone(params, ids, n, **kwargs):
    """The text `generate` gives these prompt ids by themselves, up to end-of-text."""
    out = generate(params, CFG, ids, n, eos_id=TOK.eot_id, **kwargs)
    new = out.tokens[0, : out.lengths[0]].tolist()
    return TOK.decode([t for t in new if t != TOK.eot_id]), len(new)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    health = httpx.get(f"{server}/health", timeout=5).json()
    assert health["status"] == "ok" and health["slots"] == 4


def test_completion_and_chat_equal_generate(client, params):
    prompt = "Every effort moves you"
    reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0)
    text, drawn = alone(params, TOK.encode(prompt), 20)
    assert reply.choices[0].text == text and len(text) > 0
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == drawn
    assert reply.choices[0].finish_reason == ("length" if drawn == 20 else "stop")

    question = "Name a colour."
    chat = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": question}], max_tokens=15,
        temperature=0)
    ids = TOK.encode(format_prompt({"instruction": question, "input": ""}, "alpaca"))
    assert chat.choices[0].message.content == alone(params, ids, 15)[0]
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(ids)

    # a seed makes sampling repeatable, and equal to generate's with PRNGKey(seed)
    kwargs = dict(model=NAME, prompt="abc", max_tokens=12, temperature=0.9, top_p=0.9, seed=5)
    first = client.completions.create(**kwargs).choices[0].text
    assert first == client.completions.create(**kwargs).choices[0].text
    assert first == alone(params, TOK.encode("abc"), 12, rng=jax.random.PRNGKey(5),
                          temperature=0.9, top_p=0.9)[0]


def test_streaming_and_stop(client, params):
    prompt = "The quick brown fox"
    full = alone(params, TOK.encode(prompt), 30)[0]
    pieces, reasons, usage = [], [], None
    for event in client.completions.create(model=NAME, prompt=prompt, max_tokens=30,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        if event.choices:
            pieces.append(event.choices[0].text)
            reasons.append(event.choices[0].finish_reason)
        if event.usage is not None:
            usage = event.usage
    assert "".join(pieces) == full and reasons[-1] in ("length", "stop")
    assert usage.prompt_tokens == len(prompt) and usage.total_tokens > len(prompt)

    stop = full[4:7]
    cut = client.completions.create(model=NAME, prompt=prompt, max_tokens=30, temperature=0,
                                    stop=["\x00never", stop])
    assert cut.choices[0].text == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"

    question = "Say hi."
    deltas = [e.choices[0].delta for e in client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": question}], max_tokens=10,
        temperature=0, stream=True)]
    assert deltas[0].role == "assistant"
    ids = TOK.encode(format_prompt({"instruction": question, "input": ""}, "alpaca"))
    assert "".join(d.content or "" for d in deltas) == alone(params, ids, 10)[0]


def test_errors_are_openai_errors(server, client):
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and "gpt-9" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="hi", max_tokens=300)
    assert err.value.body["param"] == "max_tokens" and "context length of 256" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}],
                                       temperature=-0.5)
    assert err.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=NAME, prompt="y" * 300, max_tokens=1)
    assert err.value.body["code"] == "context_length_exceeded" and "300 tokens" in str(err.value)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    bad = httpx.post(f"{server}/v1/completions", content=b'{"model": "tiny", "prompt": ',
                     headers=headers, timeout=5)
    assert bad.status_code == 400
    assert "not valid JSON" in bad.json()["error"]["message"]
    assert httpx.get(f"{server}/v1/nothing", headers=headers, timeout=5).json()["error"]["code"] \
        == "not_found"


def test_a_client_that_goes_away_frees_its_slot(server):
    """A streaming client that closes after the first token cancels its
    request. The tiny model may finish 250 tokens before a loaded machine
    delivers the close, so up to 5 tries: one must be cancelled."""
    headers = {"Authorization": f"Bearer {KEY}"}

    def health():
        return httpx.get(f"{server}/health", headers=headers, timeout=5).json()

    body = {"model": NAME, "prompt": "Once", "max_tokens": 250, "temperature": 0, "stream": True,
            "stop": ["\x00never"]}
    before = health()["finished"].get("cancelled", 0)
    for _ in range(5):
        with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=headers,
                          timeout=10) as reply:
            next(reply.iter_lines())  # the first token has come: the request is running
        for _ in range(100):  # until the request has ended, bounded
            now = health()
            if now["busy"] == 0:
                break
            time.sleep(0.05)
        assert now["busy"] == 0, now
        if now["finished"].get("cancelled", 0) > before:
            break
    assert now["finished"].get("cancelled", 0) == before + 1, now


def test_64_requests_from_16_clients_each_get_their_own_answer(client, params):
    prompts = [f"request {i}: {'abcdefgh'[i % 8] * (1 + i % 5)}" for i in range(64)]
    lengths = [4 + (7 * i) % 37 for i in range(64)]

    def ask(i):
        reply = client.completions.create(model=NAME, prompt=prompts[i], max_tokens=lengths[i],
                                          temperature=0)
        return i, reply.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = dict(pool.map(ask, range(64), timeout=240))
    assert sorted(answers) == list(range(64))
    for i in range(64):
        assert answers[i] == alone(params, TOK.encode(prompts[i]), lengths[i])[0], i


def test_chat_messages_in_the_chat_template_or_the_prompt_format(tmp_path):
    """Without a server: a folder's chat template renders whole conversations
    as transformers does; a run's prompt format takes one user message."""
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from jaxllm.hf_tokenizer import HFTokenizer
    from jaxllm.serve.app import APIError, ServedModel, read_request
    from test_hf_tokenizer import LLAMA_TEMPLATE, _byte_level_bpe, _save

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    folder = _save(tmp_path / "llama", _byte_level_bpe(specials, bos="<|begin_of_text|>"),
                   {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                    "chat_template": LLAMA_TEMPLATE})
    engine = SimpleNamespace(config=SimpleNamespace(context_length=512, vocab_size=420))
    scheduler = SimpleNamespace(engine=engine)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": "Name a colour."}]
    templated = ServedModel("m", scheduler, HFTokenizer(folder), "template")
    req, stream, _ = read_request(templated, {"model": "m", "messages": messages,
                                              "max_tokens": 5}, chat=True)
    expected = AutoTokenizer.from_pretrained(folder).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(req.prompt) == list(expected) and req.max_tokens == 5 and not stream

    alpaca = ServedModel("m", scheduler, TOK, "alpaca")
    with pytest.raises(APIError, match=r"single user message.*\['system', 'user', 'assistant'"):
        read_request(alpaca, {"model": "m", "messages": messages}, chat=True)
    req, _, _ = read_request(alpaca, {"model": "m", "messages": messages[3:]}, chat=True)
    assert TOK.decode(req.prompt) == format_prompt({"instruction": "Name a colour.",
                                                    "input": ""}, "alpaca")
    assert req.max_tokens == 512 - len(req.prompt)  # chat: the rest of the context
