"""The serving scheduler without a socket: continuous batching over a tiny
model, each greedy answer equal to `jaxllm.generate` for its prompt alone."""

import jax
import numpy as np
import pytest

import jaxllm
from jaxllm.cli.generate import token_bytes
from jaxllm.generate import TRACE_COUNTS, generate
from jaxllm.serve.engine import SlotEngine, cache_lengths
from jaxllm.serve.scheduler import Request, Scheduler
from jaxllm.tokenizer import ByteTokenizer

CFG = jaxllm.GPTConfig(vocab_size=257, context_length=64, emb_dim=32, n_heads=4, n_layers=2,
                       drop_rate=0.0, qkv_bias=True)
TOK = ByteTokenizer()
PROMPTS = ["Hi", "Every effort moves you", "a", "The quick brown fox jumps", "xyz",
           "Hello, world", "0123456789", "q"]


@pytest.fixture(scope="module")
def params():
    return jaxllm.init_params(CFG, jax.random.PRNGKey(0))


@pytest.fixture
def scheduler(params):
    engine = SlotEngine(params, CFG, slots=3)
    return Scheduler(engine, lambda t: token_bytes(TOK, t), TOK.stop_ids)


def alone(params, prompt, n, **kwargs):
    """The ids `generate` gives this prompt by itself, without the end-of-text."""
    out = generate(params, CFG, TOK.encode(prompt), n, eos_id=TOK.eot_id, **kwargs)
    return [t for t in out.tokens[0, : out.lengths[0]].tolist() if t != TOK.eot_id]


def drain(scheduler, limit=500):
    for _ in range(limit):
        if not scheduler.waiting and not scheduler.busy:
            return
        scheduler.step()
    raise AssertionError("the scheduler did not finish its requests")


def test_slots_are_reused_and_greedy_answers_equal_generate(scheduler, params):
    """8 requests of different lengths through 3 slots: each answer is the
    prompt's own, a finished request's slot goes to the next at once, and
    nothing recompiles once every bucket has been seen."""
    lengths = [5, 17, 9, 3, 12, 7, 20, 4]
    requests = [scheduler.submit(Request(TOK.encode(p), n)) for p, n in zip(PROMPTS, lengths)]
    seen_busy = []
    traces = None
    for _ in range(300):
        if not scheduler.waiting and not scheduler.busy:
            break
        scheduler.step()
        seen_busy.append(scheduler.busy)
        if scheduler.steps == 3:
            traces = dict(TRACE_COUNTS)
    for r, p, n in zip(requests, PROMPTS, lengths):
        assert r.done.is_set() and r.finish_reason in ("length", "stop")
        assert r.tokens == alone(params, p, n), p
        assert r.text == TOK.decode(r.tokens)
    # continuous batching: never more than the slots, and the slots stay full
    # while requests wait
    assert max(seen_busy) == 3
    assert scheduler.steps < sum(lengths)  # shared steps, not one request after another
    assert scheduler.steps <= max(lengths) + sum(sorted(lengths)[:-3]) + len(lengths)
    assert TRACE_COUNTS["serve_decode"] == traces["serve_decode"]  # no recompiling


def test_a_freed_slot_is_taken_at_the_next_step(scheduler):
    short = scheduler.submit(Request(TOK.encode("a"), 2))
    others = [scheduler.submit(Request(TOK.encode("b"), 30)) for _ in range(2)]
    waiting = scheduler.submit(Request(TOK.encode("c"), 4))
    scheduler.step()  # three admitted together (one prefill), the fourth waits
    assert scheduler.busy == 3 and list(scheduler.waiting) == [waiting]
    while not short.done.is_set():
        scheduler.step()
    assert scheduler.busy == 2 and list(scheduler.waiting) == [waiting]
    scheduler.step()  # the waiting request takes the free slot and gets a token
    assert scheduler.running.count(waiting) == 1 and len(waiting.tokens) == 1
    assert not any(o.done.is_set() for o in others)


def test_cancel_frees_the_slot_and_keeps_the_others_right(scheduler, params):
    keep = scheduler.submit(Request(TOK.encode(PROMPTS[1]), 25))
    gone = scheduler.submit(Request(TOK.encode(PROMPTS[3]), 25))
    queued = scheduler.submit(Request(TOK.encode(PROMPTS[2]), 25))
    never = scheduler.submit(Request(TOK.encode(PROMPTS[4]), 25))
    for _ in range(5):
        scheduler.step()
    scheduler.cancel(gone)
    scheduler.cancel(never)
    scheduler.step()
    assert gone.finish_reason == "cancelled" and gone not in scheduler.running
    assert never.finish_reason == "cancelled" and never.tokens == []
    drain(scheduler)
    assert keep.tokens == alone(params, PROMPTS[1], 25)
    assert queued.tokens == alone(params, PROMPTS[2], 25)


def test_stop_strings_cut_the_text_and_are_never_streamed(scheduler, params):
    full = TOK.decode(alone(params, PROMPTS[5], 30))
    assert len(full) >= 12
    stop = full[6:9]  # a stop string the greedy answer is sure to contain
    pieces, ends = [], []
    r = scheduler.submit(Request(TOK.encode(PROMPTS[5]), 30, stop=["never there", stop],
                                 listener=lambda d, reason: (pieces.append(d), ends.append(reason))))
    drain(scheduler)
    assert r.finish_reason == "stop"
    assert r.text == full[: full.find(stop)]
    assert "".join(pieces) == r.text and ends[-1] == "stop" and ends[:-1] == [None] * (len(ends) - 1)


def test_sampling_with_a_seed_equals_generate_alone(scheduler, params):
    """A sampled request beside greedy ones draws what `generate` draws for it
    alone with rng=PRNGKey(seed), and the greedy ones are unchanged."""
    sampled = scheduler.submit(Request(TOK.encode(PROMPTS[6]), 15, temperature=0.9, top_p=0.8,
                                       seed=7))
    greedy = scheduler.submit(Request(TOK.encode(PROMPTS[7]), 15))
    drain(scheduler)
    assert sampled.tokens == alone(params, PROMPTS[6], 15, rng=jax.random.PRNGKey(7),
                                   temperature=0.9, top_p=0.8)
    assert greedy.tokens == alone(params, PROMPTS[7], 15)


def test_requests_that_do_not_fit_are_refused(scheduler):
    with pytest.raises(ValueError, match=r"65 tokens; it must have 1 to 64 \(the context length\)"):
        scheduler.submit(Request(list(range(65)), 1))
    with pytest.raises(ValueError, match=r"max_tokens 60 .* 10 tokens.*from 1 to 54"):
        scheduler.submit(Request(list(range(10)), 60))
    assert not scheduler.waiting


LLAMA = jaxllm.GPTConfig(vocab_size=257, context_length=64, emb_dim=32, n_heads=4, n_kv_heads=2,
                         n_layers=2, norm="rmsnorm", positions="rope", mlp="swiglu",
                         qkv_bias=False, out_bias=False, mlp_bias=False, drop_rate=0.0,
                         qk_norm=True)


def lora_params(params):
    """GPT-2 with unmerged LoRA adapters whose B is not zero (so they count)."""
    from jaxllm.lora import init_lora, with_adapters

    adapters = init_lora(params, CFG, jax.random.PRNGKey(3), rank=2)
    adapters = {path: {**ab, "b": 0.5 * jax.random.normal(jax.random.PRNGKey(i), ab["b"].shape)}
                for i, (path, ab) in enumerate(adapters.items())}
    return with_adapters(params, adapters, alpha=4.0)


@pytest.mark.parametrize("variant", ["llama_gqa_qknorm", "gpt2_unmerged_lora"])
def test_other_families_and_unmerged_lora_equal_generate(variant, params):
    config = LLAMA if variant.startswith("llama") else CFG
    p = (jaxllm.init_params(LLAMA, jax.random.PRNGKey(1)) if config is LLAMA
         else lora_params(params))
    scheduler = Scheduler(SlotEngine(p, config, slots=2), lambda t: token_bytes(TOK, t),
                          TOK.stop_ids)
    prompts, lengths = ["Hi", "xyz", "Hello, world"], [9, 14, 6]  # one bucket: few compilations
    requests = [scheduler.submit(Request(TOK.encode(q), n)) for q, n in zip(prompts, lengths)]
    drain(scheduler)
    for r, q, n in zip(requests, prompts, lengths):
        out = generate(p, config, TOK.encode(q), n, eos_id=TOK.eot_id)
        assert r.tokens == [t for t in out.tokens[0, : out.lengths[0]].tolist()
                            if t != TOK.eot_id], (variant, q)
    if variant.endswith("lora"):  # the adapters change the answer
        plain = generate(params, CFG, TOK.encode(prompts[1]), 14).tokens[0].tolist()
        assert requests[1].tokens != plain


def test_a_failing_step_ends_every_request_with_an_error(scheduler):
    """The loop survives a model that raises: the requests under way end with
    finish reason "error" (and why), and later ones are served."""
    import threading

    real = scheduler.engine.decode
    calls = []

    def decode(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(*args)

    scheduler.engine.decode = decode
    thread = threading.Thread(target=scheduler.run, daemon=True)
    thread.start()
    try:
        first = [scheduler.submit(Request(TOK.encode(p), 20)) for p in PROMPTS[:4]]
        assert all(r.done.wait(30) for r in first)
        assert {r.finish_reason for r in first} == {"error"}
        assert scheduler.error == "RuntimeError: out of memory" and scheduler.busy == 0
        later = scheduler.submit(Request(TOK.encode("ok"), 3))
        assert later.done.wait(30) and later.finish_reason == "length"
    finally:
        scheduler.close()
        thread.join(10)


def test_a_decode_step_runs_on_the_occupied_slots_only(params):
    """A lone request on a 4-slot engine decodes a batch of two; waiting
    requests join as many at a step as one prefill of a context's worth of
    padded tokens holds, in the lowest free slots; when a slot frees in the
    middle (a hole before a busy slot), the step covers up to the last busy
    slot and every answer is still its prompt's own; `warm_up` compiles
    every program serving then runs."""
    engine = SlotEngine(params, CFG, slots=4)
    assert engine.buckets == (2, 4)
    engine.warm_up()
    traces = TRACE_COUNTS["serve_decode"], TRACE_COUNTS["serve_prefill"]
    scheduler = Scheduler(engine, lambda t: token_bytes(TOK, t), TOK.stop_ids)
    lone = scheduler.submit(Request(TOK.encode(PROMPTS[1]), 6))
    drain(scheduler)
    assert engine.rows_decoded == {2: 6}
    assert lone.tokens == alone(params, PROMPTS[1], 6)

    def run():
        engine.rows_decoded.clear()
        lengths = [20, 2, 16, 4, 9]  # slot 1 frees early while 0 and 2 go on
        requests = [scheduler.submit(Request(TOK.encode(p), n))
                    for p, n in zip(PROMPTS, lengths)]
        placed, busy = {}, []
        for _ in range(200):
            if not scheduler.waiting and not scheduler.busy:
                break
            scheduler.step()
            busy.append(scheduler.busy)
            for slot, r in enumerate(scheduler.running):
                placed.setdefault(r, slot)
        # prompts of 2 and 22 bytes: two rows of the 32-token bucket fill the
        # 64-token context, so two join at the first step and two at the
        # second, which ends the 2-token request
        assert busy[:3] == [2, 3, 4]
        assert [placed[r] for r in requests] == [0, 1, 2, 3, 1]  # lowest free slot first
        for r, p, n in zip(requests, PROMPTS, lengths):
            assert r.tokens == alone(params, p, n), p
        return dict(engine.rows_decoded)

    rows = run()
    # two rows at the first step, four while a busy slot sits past the first
    # two (slot 2 until its 16th token, at step 17), two after
    assert rows == {2: 4, 4: 16}
    assert run() == rows
    assert (TRACE_COUNTS["serve_decode"], TRACE_COUNTS["serve_prefill"]) == traces  # no recompiling


def test_cache_lengths_grow_by_four_up_to_the_context():
    assert cache_lengths(1024) == (64, 256, 1024)
    assert cache_lengths(100) == (64, 100)
    assert cache_lengths(64) == (64,)
    assert cache_lengths(32) == (32,)


def test_the_cache_grows_for_a_long_request_and_shrinks_after_it():
    """On a 256-token context the slots' cache starts at 64 positions; a
    request that passes 64 tokens grows every slot's cache to 256 (the
    short request beside it unharmed), and once it ends the next request
    decodes on 64 again. Each answer equals `generate` alone, whose cache
    always has the context's 256 positions; `warm_up` compiled both lengths."""
    config = CFG.replace(context_length=256)
    p = jaxllm.init_params(config, jax.random.PRNGKey(2))
    engine = SlotEngine(p, config, slots=2)
    assert engine.cache_lengths == (64, 256)
    engine.warm_up()
    kinds = ("serve_decode", "serve_prefill", "serve_insert", "serve_resize")
    traces = [TRACE_COUNTS[k] for k in kinds]
    scheduler = Scheduler(engine, lambda t: token_bytes(TOK, t), TOK.stop_ids)
    prompt, new = TOK.encode(PROMPTS[3]), 70
    long = scheduler.submit(Request(prompt, new))
    short = scheduler.submit(Request(TOK.encode(PROMPTS[0]), 10))
    drain(scheduler)
    # the step that feeds a request's k-th new token holds len(prompt) + k positions
    at_64 = 64 - len(prompt)
    assert engine.lengths_decoded == {64: at_64, 256: new - at_64}
    assert engine.cache_length == 256
    late = scheduler.submit(Request(TOK.encode(PROMPTS[1]), 5))
    drain(scheduler)
    assert engine.lengths_decoded[64] == at_64 + 5 and engine.cache_length == 64
    for r, q, n in ((long, PROMPTS[3], new), (short, PROMPTS[0], 10), (late, PROMPTS[1], 5)):
        out = generate(p, config, TOK.encode(q), n, eos_id=TOK.eot_id)
        assert r.tokens == [t for t in out.tokens[0, : out.lengths[0]].tolist()
                            if t != TOK.eot_id], q
    assert [TRACE_COUNTS[k] for k in kinds] == traces  # no recompiling


def test_the_cpu_recipe_serves_what_generate_gives_on_it(params):
    """`--cpu-recipe` (MKL's products and the row-wise LayerNorm on this
    Intel CPU): the engine's greedy answers equal `generate` on the same
    config, and its logits equal the XLA path's to float32 rounding."""
    from jaxllm.cli.generate import inference_recipe
    from jaxllm.kernels.recipe import cpu_recipe

    config = inference_recipe(CFG)
    expected = {k: v for k, v in cpu_recipe().items() if k in ("matmul_impl", "norm_impl")}
    assert {k: getattr(config, k) for k in expected} == expected
    assert config.replace(**{k: getattr(CFG, k) for k in expected}) == CFG
    assert inference_recipe(CFG.replace(compute_dtype="bfloat16")).matmul_impl == "xla"
    scheduler = Scheduler(SlotEngine(params, config, slots=2), lambda t: token_bytes(TOK, t),
                          TOK.stop_ids)
    prompts, lengths = ["Hi", "Every effort moves you"], [12, 7]
    requests = [scheduler.submit(Request(TOK.encode(q), n)) for q, n in zip(prompts, lengths)]
    drain(scheduler)
    for r, q, n in zip(requests, prompts, lengths):
        out = generate(params, config, TOK.encode(q), n, eos_id=TOK.eot_id, return_logits=True)
        assert r.tokens == [t for t in out.tokens[0, : out.lengths[0]].tolist()
                            if t != TOK.eot_id], q
        plain = generate(params, CFG, TOK.encode(q), n, eos_id=TOK.eot_id, return_logits=True)
        np.testing.assert_allclose(out.logits, plain.logits, atol=1e-4, rtol=1e-4)
