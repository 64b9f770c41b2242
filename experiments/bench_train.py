"""Training throughput: jaxllm's train step against PyTorch peers of the same model.

    python -m experiments.bench_train                 # CPU: the issue's config and the small preset
    python -m experiments.bench_train --gpu           # GPU: GPT-2 124M tied and untied, bf16, T1024, B16,
                                                      # and Qwen3-0.6B (--case qwen3), bf16, T1024, B4
    python -m experiments.bench_train --device-check  # every peer on a tiny config; losses must agree
    python -m experiments.bench_train --threads 1     # both pinned to one core
    python -m experiments.bench_train --profile       # and a per-op profile of jaxllm's step
    python -m experiments.bench_train --torch-compile-cpu   # CPU: the compiled peers too (slow)
    python -m experiments.bench_train --case llama    # CPU: the Llama-style case alone

Both sides train the same model from the same weights on the same batch:
jaxllm through `make_train_step` (AdamW from `make_optimizer`, global-norm
clipping on), PyTorch through the `TorchGPT` module below, as strong as
PyTorch users run it: the module returns its loss (cross-entropy on float32
logits inside the module, so under torch.compile the logits stay in the
compiled graph), the vocabulary is padded and the head tied exactly as
jaxllm's, AdamW is `fused=True` on CUDA, clipping is `clip_grad_norm_` with
foreach on CUDA. A Llama-family case (RMSNorm, RoPE, SwiGLU, grouped-query
attention) meets transformers' own `LlamaForCausalLM` (`Qwen3ForCausalLM` with
q/k norm) with the same weights and SDPA attention (`TorchHF`). The peer variants (PEER_VARIANTS) differ in what is compiled:
nothing, the module, the whole step, the module with max-autotune. On CPU the
peer runs eagerly in float32 (the compiled variants with --torch-compile-cpu);
on GPU with bf16 autocast. The fastest variant is the ratio's denominator; the
others are reported beside it. Before timing, every peer's first two losses
(before and after one AdamW step) must equal jaxllm's: to 1e-5 in float32, 2e-2
in bf16; the run exits 1 where they do not. All are timed interleaved (a block
of steps of each, each repeat starting with the next one along) because the
machine is shared and its speed drifts. Tokens/s are medians over the repeats;
a ratio is the median of the repeats' own ratios (each repeat's neighbouring
blocks), so a slowdown that spans a repeat cancels.

Model FLOPs per token are 6N + 12*L*H*Q*T (N = weights used in matrix
products, L layers, H heads, Q head size, T sequence length). MFU divides the
achieved FLOP rate by a large matrix product's rate measured in the same run
(float32 on CPU, bf16 on GPU) and, where known, by the datasheet peak.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import glob
import os
import platform
import re
import resource
import shutil
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from experiments.common import markdown_table, results_dir, write_report
from jaxllm.config import GPTConfig, count_params, get_preset
from jaxllm.host_memory import reuse_host_memory
from jaxllm.kernels.recipe import cpu_recipe, cpu_vendor, cpuinfo_field
from jaxllm.model import init_params
from jaxllm.train import TrainConfig, init_train_state, make_optimizer, make_train_step

# Datasheet dense bf16 peaks (FLOP/s) by a substring of the device name.
DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12}

ISSUE_CPU = GPTConfig(vocab_size=2048, context_length=256, emb_dim=256, n_heads=4, n_layers=4,
                      drop_rate=0.0)
# The same size as a Llama-family model: 2 key/value heads, SwiGLU of width 704 (~8/3 d).
LLAMA_CPU = GPTConfig(vocab_size=2048, context_length=256, emb_dim=256, n_heads=4, n_kv_heads=2,
                      n_layers=4, ffn_dim=704, norm="rmsnorm", positions="rope", mlp="swiglu",
                      out_bias=False, mlp_bias=False, drop_rate=0.0, rope_theta=500000.0)
# The native CPU kernels for attention and LayerNorm compute GPT-2's operations only.
LLAMA_RECIPE = {"attn_impl": "blockwise", "norm_impl": "xla"}


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark row: a model, a batch shape and the precision recipe."""

    name: str
    config: GPTConfig
    batch: int
    seq: int
    gpu_recipe: bool = False  # bf16 compute and autocast; fused AdamW on CUDA
    grad_accum: int = 1  # jaxllm's micro-batches per step (same batch, same mean gradient)
    peers: tuple[str, ...] | None = None  # torch peer variants; None: the run's default


# jaxllm's CPU recipe for this machine (jaxllm.kernels.recipe): the native
# kernels for attention, LayerNorm and the cross-entropy, and the dense layers
# by MKL on Intel CPUs (each batch run as micro-batches, whose activations stay
# closer to the cores) or by XLA's dots elsewhere.
CPU_RECIPE = cpu_recipe()
CPU_GRAD_ACCUM = CPU_RECIPE.pop("grad_accum")


def cpu_cases(overrides: dict, grad_accum: int | None = None) -> list[Case]:
    small = get_preset("small")
    over = {**CPU_RECIPE, **overrides}
    accum = CPU_GRAD_ACCUM if grad_accum is None else grad_accum
    return [Case("issue-cpu (L4 d256 h4 T256 V2048)", ISSUE_CPU.replace(**over), 8, 256,
                 grad_accum=accum),
            Case("small preset (L4 d128 h4 T128 V257)", small.replace(**over), 16, 128,
                 grad_accum=accum),
            Case("llama-style (L4 d256 h4 kv2 T256 V2048)",
                 LLAMA_CPU.replace(**{**over, **LLAMA_RECIPE, **overrides}), 8, 256,
                 grad_accum=accum)]


def gpu_cases(overrides: dict) -> list[Case]:
    """GPT-2 124M as published (biases everywhere, head tied to the token table), the
    vocabulary padded to 50304 rows on both sides, and the same model untied beside it.
    The untied case meets only the `compile` peer (nanoGPT's arrangement) by default, so
    that both cases' compiles fit in one 8-minute device call (experiments/bench_gpu.sh)."""
    fast = dict(compute_dtype="bfloat16", param_dtype="float32", drop_rate=0.0,
                attn_impl="cudnn", vocab_multiple=128, qkv_bias=True)
    base = get_preset("gpt2-124m").replace(**fast)
    return [Case("gpt2-124m tied bf16 T1024 B16 V50304",
                 base.replace(tie_embeddings=True, **overrides), 16, 1024, gpu_recipe=True),
            Case("gpt2-124m untied bf16 T1024 B16 V50304",
                 base.replace(tie_embeddings=False, **overrides), 16, 1024, gpu_recipe=True,
                 peers=("compile",)),
            # Qwen3-0.6B as published (its vocabulary is a multiple of 128 already), against
            # transformers' Qwen3ForCausalLM with SDPA (flash) attention, fused AdamW and
            # torch.compile: `bash experiments/bench_gpu.sh` with MODE=qwen3.
            Case("qwen3-0.6b bf16 T1024 B4 V151936",
                 get_preset("qwen3-0.6b").replace(compute_dtype="bfloat16", param_dtype="float32",
                                                  attn_impl="cudnn", **overrides),
                 4, 1024, gpu_recipe=True, peers=("eager", "compile", "compile-step"))]


def device_check_cases(overrides: dict, on_gpu: bool) -> list[Case]:
    """A tiny model with a padded vocabulary (100 -> 128) and a tied head: bf16 with the GPU
    recipe on a GPU; float32 on the CPU, where the peers' losses must equal jaxllm's to 1e-5."""
    tiny = GPTConfig(vocab_size=100, context_length=64, emb_dim=64, n_heads=4, n_layers=2,
                     drop_rate=0.0, compute_dtype="bfloat16" if on_gpu else "float32",
                     vocab_multiple=128, tie_embeddings=True, qkv_bias=True,
                     attn_impl="cudnn" if on_gpu else "xla")
    return [Case("device-check tiny " + ("bf16" if on_gpu else "fp32") + " tied V100->128",
                 tiny.replace(**overrides), 4, 64, gpu_recipe=on_gpu)]


# -- the PyTorch peer ----------------------------------------------------------
# The peer variants, from plain to most compiled. Each trains the loss-returning module
# below with the same AdamW and clipping; they differ in what torch.compile sees:
#   eager         nothing (on the CPU the default peer)
#   compile       the module, loss included: torch.compile(model)
#   compile-step  the whole step in one compiled function (forward, backward, clipping,
#                 the optimizer step; Dynamo splits it at `backward`, the rest stays compiled).
#                 Its AdamW is the foreach one, which inductor compiles into its own fused
#                 kernels (torch runs the `fused=True` kernel outside the graph, uncompiled)
#   max-autotune  the module under torch.compile(mode="max-autotune"): Triton GEMM tuning
#                 and CUDA graphs; GPU only, minutes to compile
PEER_VARIANTS = ("eager", "compile", "compile-step", "max-autotune")
COMPILED_PEERS = ("compile", "compile-step", "max-autotune")

# Added to the padding columns of the logits, as jaxllm's `lm_head` does for float32.
PAD_LOGIT = -1e30


class TorchBlock(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        d = c.emb_dim
        self.n_heads = c.n_heads
        self.norm1 = nn.LayerNorm(d, eps=c.ln_eps)
        self.qkv = nn.Linear(d, 3 * d, bias=c.qkv_bias)
        self.out = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=c.ln_eps)
        self.fc = nn.Linear(d, c.hidden_dim)
        self.proj = nn.Linear(c.hidden_dim, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        return x + self.proj(F.gelu(self.fc(self.norm2(x)), approximate="tanh"))


class TorchGPT(nn.Module):
    """GPT-2 in PyTorch with jaxllm's parameter layout and math (no dropout).

    The vocabulary is padded as jaxllm pads it: the token table (and an untied head) have
    `padded_vocab_size` rows, and the padding columns of the logits get `PAD_LOGIT` added,
    so they take no probability and the loss equals the unpadded one. The head is tied to
    the token table exactly when jaxllm's is. `forward(tokens, targets)` returns the mean
    cross-entropy, computed on float32 logits inside the module, so under torch.compile the
    float32 logits never leave the compiled graph (nanoGPT's arrangement);
    `forward(tokens)` returns the logits over the real vocabulary.
    """

    def __init__(self, c: GPTConfig):
        super().__init__()
        rows = c.padded_vocab_size
        self.vocab_size, self.tied = c.vocab_size, c.tie_embeddings
        self.tok_emb = nn.Embedding(rows, c.emb_dim)
        self.pos_emb = nn.Embedding(c.context_length, c.emb_dim)
        self.blocks = nn.ModuleList(TorchBlock(c) for _ in range(c.n_layers))
        self.final_norm = nn.LayerNorm(c.emb_dim, eps=c.ln_eps)
        if not self.tied:
            self.out_head = nn.Linear(c.emb_dim, rows, bias=False)
        pad = None
        if rows != c.vocab_size:
            pad = torch.zeros(rows)
            pad[c.vocab_size:] = PAD_LOGIT
        self.register_buffer("vocab_pad", pad, persistent=False)

    def forward(self, tokens, targets=None):
        x = self.tok_emb(tokens) + self.pos_emb(torch.arange(tokens.shape[1], device=tokens.device))
        for blk in self.blocks:
            x = blk(x)
        x = self.final_norm(x)
        w = self.tok_emb.weight if self.tied else self.out_head.weight
        logits = x @ w.T
        if targets is None:
            return logits[..., : self.vocab_size]
        logits = logits.float()
        if self.vocab_pad is not None:
            logits = logits + self.vocab_pad
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    @torch.no_grad()
    def load_jaxllm(self, params, c: GPTConfig) -> "TorchGPT":
        """Copy a jaxllm parameter tree in (kernels transposed, padding rows included)."""
        def put(dst, src, transpose=False):
            a = torch.from_numpy(np.array(jnp.asarray(src, jnp.float32)))
            dst.copy_(a.T if transpose else a)

        put(self.tok_emb.weight, params["tok_emb"]["embedding"])
        put(self.pos_emb.weight, params["pos_emb"]["embedding"])
        for blk, p in zip(self.blocks, params["blocks"]):
            for mod, src in ((blk.norm1, p["norm1"]), (blk.norm2, p["norm2"])):
                put(mod.weight, src["scale"])
                put(mod.bias, src["bias"])
            for mod, src in ((blk.qkv, p["attn"]["qkv"]), (blk.out, p["attn"]["out"]),
                             (blk.fc, p["ffn"]["fc"]), (blk.proj, p["ffn"]["proj"])):
                put(mod.weight, src["kernel"], transpose=True)
                if mod.bias is not None:
                    put(mod.bias, src["bias"])
        put(self.final_norm.weight, params["final_norm"]["scale"])
        put(self.final_norm.bias, params["final_norm"]["bias"])
        if not self.tied:
            put(self.out_head.weight, params["out_head"]["kernel"], transpose=True)
        return self


class TorchHF(nn.Module):
    """A Llama-family model as transformers runs it: `LlamaForCausalLM` (or
    `Qwen3ForCausalLM`) built from `jaxllm.hf.hf_config_dict`, SDPA attention,
    with the same weights (`to_hf_state_dict`) and the same loss contract as
    `TorchGPT`. The vocabulary is not padded (jaxllm's is not either here)."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        import transformers

        from jaxllm.hf import hf_config_dict

        if c.padded_vocab_size != c.vocab_size:
            raise ValueError("the transformers peer has no padded vocabulary: vocab_multiple=1")
        d = hf_config_dict(c.replace(param_dtype="float32"))
        cls = getattr(transformers, d["architectures"][0])
        hf = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
        hf._attn_implementation = "sdpa"
        self.model = cls(hf)

    def forward(self, tokens, targets=None):
        logits = self.model(tokens).logits
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())

    @torch.no_grad()
    def load_jaxllm(self, params, c: GPTConfig) -> "TorchHF":
        from jaxllm.hf import to_hf_state_dict

        sd = {k: torch.from_numpy(v.copy()) for k, v in to_hf_state_dict(params, c).items()}
        self.model.load_state_dict(sd, strict=not c.tie_embeddings)
        return self


def torch_optimizer(model: nn.Module, tc: TrainConfig, fused: bool):
    """AdamW with decay on matrices only (not embeddings), like `make_optimizer`;
    `fused=True` is the one-kernel CUDA AdamW."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "emb" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                             fused=fused or None)


def make_torch_step(model, opt, tc: TrainConfig, autocast_device: str | None):
    """`step(x, y) -> loss` of a loss-returning `model`: forward (under bf16 autocast when
    `autocast_device` is given), backward, `clip_grad_norm_` (foreach on CUDA, the only
    kind of device it has there), the optimizer step. The loss is the one before the update."""
    params = [p for p in model.parameters()]
    foreach = True if params[0].is_cuda else None

    def step(x, y):
        ctx = (torch.autocast(autocast_device, dtype=torch.bfloat16) if autocast_device
               else contextlib.nullcontext())
        with ctx:
            loss = model(x, y)
        loss.backward()
        if tc.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip, foreach=foreach)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def make_peer(variant: str, c: GPTConfig, params, tc: TrainConfig, device: str, bf16: bool):
    """A fresh peer of `variant` (see PEER_VARIANTS) from jaxllm's `params`: its step function."""
    if variant not in PEER_VARIANTS:
        raise ValueError(f"unknown peer variant {variant!r}; choose from {PEER_VARIANTS}")
    model = (TorchGPT if c.family == "gpt2" else TorchHF)(c).load_jaxllm(params, c).to(device)
    opt = torch_optimizer(model, tc, fused=device == "cuda" and variant != "compile-step")
    autocast = device if bf16 else None
    if variant == "eager":
        return make_torch_step(model, opt, tc, autocast)
    if variant == "compile-step":
        return torch.compile(make_torch_step(model, opt, tc, autocast))
    mode = "max-autotune" if variant == "max-autotune" else None
    return make_torch_step(torch.compile(model, mode=mode), opt, tc, autocast)


def loss_tolerance(case: Case) -> float:
    """How far a peer's first losses may be from jaxllm's: float32 rounding, or bf16's."""
    return 2e-2 if case.config.compute_dtype != "float32" else 1e-5


# -- measurements ----------------------------------------------------------------
def flops_per_token(c: GPTConfig, seq: int) -> float:
    """6N + 12*L*H*Q*T, N counting the weights that enter matrix products."""
    real = c.replace(vocab_multiple=1)
    n = count_params(real)
    if c.positions == "learned":
        n -= c.context_length * c.emb_dim  # position table: a lookup
    if not c.tie_embeddings:
        n -= c.vocab_size * c.emb_dim  # the token table is a lookup; the head is separate
    return 6.0 * n + 12.0 * c.n_layers * c.n_heads * c.head_dim * seq


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def product_rate(m: int, k: int, n: int, on_gpu: bool, repeats: int = 5) -> dict:
    """FLOP/s of one (m, k) @ (k, n) product (float32 on CPU, bf16 on GPU), JAX and torch."""
    flops = 2.0 * m * k * n
    dt = jnp.bfloat16 if on_gpu else jnp.float32
    a, b = jnp.ones((m, k), dt) * 0.01, jnp.ones((k, n), dt) * 0.01
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    jax_rate = flops / median_time(lambda: mm(a, b).block_until_ready(), repeats)
    dev = "cuda" if on_gpu else "cpu"
    tdt = torch.bfloat16 if on_gpu else torch.float32
    ta, tb = (torch.full(s, 0.01, dtype=tdt, device=dev) for s in ((m, k), (k, n)))

    def torch_mm():
        ta @ tb
        if on_gpu:
            torch.cuda.synchronize()
    torch_mm()
    torch_rate = flops / median_time(torch_mm, repeats)
    return {"shape": [m, k, n], "dtype": "bfloat16" if on_gpu else "float32", "jax": jax_rate,
            "torch": torch_rate}


def matmul_rate(on_gpu: bool) -> dict:
    """FLOP/s of a large square matrix product (float32 on CPU, bf16 on GPU), JAX and torch."""
    n = 8192 if on_gpu else 1536
    r = product_rate(n, n, n, on_gpu)
    return {"n": n, "dtype": r["dtype"], "jax": r["jax"], "torch": r["torch"],
            "best": max(r["jax"], r["torch"])}


def layer_product_rates(case: Case, on_gpu: bool) -> list[dict]:
    """`product_rate` of each dense layer's forward product at the case's batch, so the
    step's MFU can be read against what its own shapes reach."""
    c, rows = case.config, case.batch * case.seq
    d, h = c.emb_dim, c.hidden_dim
    return [{"layer": name, **product_rate(rows, k, n, on_gpu, repeats=21)}
            for name, k, n in (("qkv", d, 3 * d), ("out", d, d), ("fc", d, h), ("proj", h, d),
                               ("head", d, c.padded_vocab_size))]


# Profiler events that are the runtime's own bookkeeping rather than an XLA op.
_SCAFFOLDING = ("ThunkExecutor", "SlinkyThreadPool", "end: ")


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (result shape, source op from the metadata) of an HLO module."""
    ops = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ", line)
        if m:
            source = re.search(r'op_name="([^"]*)"', line)
            ops[m.group(1)] = (m.group(2).split("{")[0], source.group(1) if source else "")
    return ops


def op_profile(run, steps: int, trace_dir: str, hlo_text: str, top: int = 25) -> list[dict]:
    """Trace `run()` (which does `steps` train steps) with jax.profiler and sum the
    time of each XLA op per step, largest first.

    GPU: the device's "XLA Ops" line. CPU: the XLA thread pool's threads; there
    the products may run asynchronously on the pool while other ops' events are
    open, so the times show proportions, not a partition of the wall time.
    """
    from jax.profiler import ProfileData

    shutil.rmtree(trace_dir, ignore_errors=True)
    jax.profiler.start_trace(trace_dir)
    run()
    jax.profiler.stop_trace()
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        return []
    total, calls = collections.Counter(), collections.Counter()
    for plane in ProfileData.from_file(files[0]).planes:
        on_device = plane.name.startswith("/device:")
        for line in plane.lines:
            if (line.name != "XLA Ops") if on_device else not line.name.startswith("tf_XLA"):
                continue
            for ev in line.events:
                if not ev.name.startswith(_SCAFFOLDING):
                    total[ev.name] += ev.duration_ns / 1e6 / steps
                    calls[ev.name] += 1 / steps
    ops, traced = hlo_ops(hlo_text), sum(total.values()) or 1.0
    return [{"op": name, "ms_per_step": ms, "calls_per_step": calls[name],
             "share": ms / traced, "shape": ops.get(name, ("", ""))[0],
             "source": ops.get(name, ("", ""))[1]}
            for name, ms in total.most_common(top)]


# Warm-up rounds (a block of each framework) before timing: until SETTLED_ROUNDS
# in a row have touched at most SETTLED_PAGES fresh pages (4 KiB) a step, and
# at most MAX_WARMUP_ROUNDS.
SETTLED_ROUNDS, SETTLED_PAGES, MAX_WARMUP_ROUNDS = 3, 500, 12


def bench_case(case: Case, tc: TrainConfig, steps: int, repeats: int, on_gpu: bool,
               peers: tuple[str, ...] = ("eager",), profile_dir: str | None = None) -> dict:
    """Time jaxllm's step against each peer variant in `peers` on one case.

    Every peer starts from jaxllm's initial weights; the first two losses of each (before
    and after one AdamW step) are recorded beside jaxllm's. The fastest peer (median
    tokens/s) is the ratio's denominator; every peer's own ratio is kept under "peers".
    """
    c = case.config
    key = jax.random.key(0)
    params = init_params(c, key)
    rng = np.random.default_rng(0)
    data = rng.integers(0, c.vocab_size, size=(case.batch, case.seq + 1))
    inputs, targets = jnp.asarray(data[:, :-1]), jnp.asarray(data[:, 1:])

    dev = "cuda" if on_gpu else "cpu"
    tx = torch.from_numpy(data[:, :-1]).to(dev)
    ty = torch.from_numpy(data[:, 1:]).to(dev)
    # The peers are built before jaxllm's first step, which donates `params`. A peer
    # that fails to build or to compile is reported and left out; the others go on.
    tsteps, errors = {}, {}
    for name in peers:
        try:
            tsteps[name] = make_peer(name, c, params, tc, dev, bf16=case.gpu_recipe)
        except Exception as err:  # noqa: BLE001 - reported in the results
            errors[name] = f"{type(err).__name__}: {err}"

    jtc = tc.replace(grad_accum=case.grad_accum)
    optimizer = make_optimizer(jtc)
    jstep = make_train_step(c, jtc, optimizer)
    state = init_train_state(params, jtc, optimizer)

    # The first two steps from identical weights: the losses before and after one
    # update must agree (same model, same batch, same optimizer).
    batch = {"tokens": inputs, "targets": targets}
    t0 = time.perf_counter()
    first = []
    for _ in range(2):
        state, metrics = jstep(state, batch)
        first.append(float(metrics["loss"]))
    compile_s = {"jaxllm": time.perf_counter() - t0}
    losses = {"jaxllm": first}
    for name, tstep in list(tsteps.items()):
        t0 = time.perf_counter()
        try:
            losses[name] = [float(tstep(tx, ty)) for _ in range(2)]
        except Exception as err:  # noqa: BLE001 - reported in the results
            errors[name] = f"{type(err).__name__}: {err}"
            del tsteps[name]
            print(f"  {name}: FAILED ({errors[name][:300]})", flush=True)
            continue
        compile_s[name] = time.perf_counter() - t0
        diff = max(abs(a - b) for a, b in zip(losses[name], first))
        print(f"  {name}: first losses {losses[name][0]:.6f}, {losses[name][1]:.6f} "
              f"(jaxllm {first[0]:.6f}, {first[1]:.6f}; |diff| {diff:.2e}), "
              f"compile + 2 steps {compile_s[name]:.1f} s", flush=True)

    def run_jax():
        nonlocal state
        for _ in range(steps):
            state, m = jstep(state, batch)
        m["loss"].block_until_ready()

    def runner(tstep):
        def run():
            for _ in range(steps):
                loss = tstep(tx, ty)
            float(loss)  # waits for the device
        return run

    runs = {"jaxllm": run_jax, **{name: runner(s) for name, s in tsteps.items()}}
    # Warm-up until the heap has settled: for its first few dozen steps a
    # process's heap still grows now and then, when a step's scratch space finds
    # no free block it fits in, and that step touches 20-70 thousand fresh pages
    # (NOTES.md, v7 and v10). The timed blocks start after SETTLED_ROUNDS rounds
    # in a row in which all the runs together touched at most SETTLED_PAGES
    # fresh pages a step each.
    clean = warmup = 0
    while clean < SETTLED_ROUNDS and warmup < MAX_WARMUP_ROUNDS:
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for run in runs.values():
            run()
        touched = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        clean = clean + 1 if touched <= SETTLED_PAGES * steps * len(runs) else 0
        warmup += 1
    times = {name: [] for name in runs}
    faults = dict.fromkeys(runs, 0)  # minor page faults: fresh memory the step touched
    names = list(runs)
    for r in range(repeats):
        # each repeat starts with the next run along, so none is always first
        for name in names[r % len(names):] + names[: r % len(names)]:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t0)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    profile = None
    if profile_dir:
        # The profile only adds detail: a trace that cannot be read must not cost
        # the timings above.
        try:
            hlo = jstep.lower(state, batch).compile().as_text()
            profile = op_profile(run_jax, steps, profile_dir, hlo)
        except Exception as err:  # noqa: BLE001 - reported, then the benchmark goes on
            print(f"  profile failed ({type(err).__name__}: {err}); timings kept", flush=True)
    tokens = steps * case.batch * case.seq
    jax_t = times["jaxllm"]
    tol = loss_tolerance(case)
    peer_results = {}
    for name in tsteps:
        # The ratio from each repeat's neighbouring blocks, then the median: a
        # slowdown of the machine that spans both blocks cancels out.
        pair = sorted(t / j for j, t in zip(jax_t, times[name]))
        peer_results[name] = {
            "tokens_per_s": tokens / statistics.median(times[name]),
            "ratio": statistics.median(pair), "pair_ratios": pair,
            "step_s": sorted(t / steps for t in times[name]),
            "first_losses": losses[name], "compile_s": compile_s[name],
            "loss_diff": max(abs(a - b) for a, b in zip(losses[name], first)),
            "page_faults_per_step": faults[name] / (steps * repeats)}
        peer_results[name]["losses_equal"] = peer_results[name]["loss_diff"] <= tol
    best = max(peer_results, key=lambda n: peer_results[n]["tokens_per_s"], default=None)
    bp = peer_results.get(best, {})
    return {"case": case.name, "config": c.to_dict(), "batch": case.batch, "seq": case.seq,
            "grad_accum": case.grad_accum,
            "steps_per_repeat": steps, "repeats": repeats,
            "jax_tokens_per_s": tokens / statistics.median(jax_t),
            "torch_peer": best, "torch_tokens_per_s": bp.get("tokens_per_s"),
            "ratio": bp.get("ratio"), "pair_ratios": bp.get("pair_ratios"),
            "jax_step_s": sorted(t / steps for t in jax_t), "torch_step_s": bp.get("step_s"),
            "page_faults_per_step": {"jax": faults["jaxllm"] / (steps * repeats),
                                     "torch": bp.get("page_faults_per_step")},
            "warmup_rounds": warmup, "first_loss_jax": first[0],
            "first_loss_torch": bp["first_losses"][0] if bp else None,
            "first_losses_jax": first, "loss_tolerance": tol,
            "losses_equal": all(p["losses_equal"] for p in peer_results.values()),
            "peer_errors": errors,
            "compile_s": {"jax": compile_s["jaxllm"], "torch": bp.get("compile_s")},
            "peers": peer_results,
            "flops_per_token": flops_per_token(c, case.seq), "profile": profile}


def machine_info(on_gpu: bool) -> dict:
    info = {"nproc": os.cpu_count(), "cpu": cpuinfo_field("model name") or "unknown",
            "cpu_vendor": cpu_vendor(),
            "python": platform.python_version(),
            "jax": jax.__version__, "torch": torch.__version__, "jax_backend": jax.default_backend(),
            "torch_threads": torch.get_num_threads(), "cores": len(os.sched_getaffinity(0))}
    if on_gpu:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def pin_cores(n: int) -> None:
    """Confine this process (XLA's thread pool and torch's) to its first `n` allowed cores.

    XLA's CPU client ignores thread-count flags such as
    `intra_op_parallelism_threads=1` (its pool keeps using every core it may
    run on), so the only way to give both frameworks the same cores is CPU
    affinity, set before either starts its threads.
    """
    allowed = sorted(os.sched_getaffinity(0))
    if not 1 <= n <= len(allowed):
        raise SystemExit(f"--threads must be between 1 and {len(allowed)} (cores available), got {n}")
    os.sched_setaffinity(0, allowed[:n])


def parse_overrides(items: list[str]) -> dict:
    """`--set attn_impl=reference` style GPTConfig overrides (values parsed as Python literals)."""
    import ast
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", action="store_true", help="GPT-2 124M bf16 on the GPU")
    ap.add_argument("--device-check", action="store_true",
                    help="run the GPU recipe on a tiny config on whatever device is present")
    ap.add_argument("--steps", type=int, default=3, help="train steps per timed block")
    ap.add_argument("--repeats", type=int, default=9, help="timed blocks per framework")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a GPTConfig field on the jaxllm side (e.g. attn_impl=reference)")
    ap.add_argument("--grad-accum", type=int, default=None,
                    help=f"jaxllm's micro-batches per CPU step (default {CPU_GRAD_ACCUM}; "
                         "1 runs each batch whole)")
    ap.add_argument("--batch", type=int, default=None,
                    help="sequences per step for every case, both frameworks "
                         "(default: 8 and 16 on CPU, 16 on GPU)")
    ap.add_argument("--out", default=None, help="results folder name under results/")
    ap.add_argument("--threads", type=int, default=None,
                    help="pin the process to this many cores and give torch as many threads "
                         "(default: all cores). 1 compares the two core for core")
    ap.add_argument("--profile", action="store_true",
                    help="also trace a block of jaxllm steps with jax.profiler and list its "
                         "costliest XLA ops (traces under results/<name>/trace-<case>)")
    ap.add_argument("--products-only", action="store_true",
                    help="measure only the matrix-product rates (the large square product and "
                         "each dense layer's shape), e.g. to compare XLA_FLAGS settings")
    ap.add_argument("--peers", default=None, metavar="LIST",
                    help="comma-separated torch peer variants from " + ", ".join(PEER_VARIANTS)
                         + ", or 'none' to time jaxllm alone (default: eager on the CPU, plus "
                           "compile and compile-step with --torch-compile-cpu or --device-check; "
                           "eager, compile and compile-step on the GPU)")
    ap.add_argument("--torch-compile-cpu", action="store_true",
                    help="on the CPU also run the compiled peers (compile, compile-step); "
                         "inductor's C++ compile takes minutes there")
    ap.add_argument("--case", default=None, metavar="SUBSTRING",
                    help="run only the cases whose name contains this (e.g. untied)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="leave glibc's malloc settings as they are (see jaxllm.host_memory); "
                         "by default the process reuses freed memory, both frameworks alike")
    args = ap.parse_args(argv)
    reused = False if args.default_malloc else reuse_host_memory()
    if args.threads is not None:
        pin_cores(args.threads)

    gpu_present = torch.cuda.is_available() and jax.default_backend() == "gpu"
    if args.gpu and not gpu_present:
        raise SystemExit("--gpu needs a CUDA GPU visible to both JAX and PyTorch")
    on_gpu = gpu_present
    if not on_gpu:
        # Same cores on both sides: XLA's CPU client uses every core it may run on.
        torch.set_num_threads(len(os.sched_getaffinity(0)))
    overrides = parse_overrides(args.set)
    if args.device_check:
        cases, name = device_check_cases(overrides, on_gpu), "bench-device-check"
    elif on_gpu:
        cases, name = gpu_cases(overrides), "bench-gpu"
    else:
        cases, name = cpu_cases(overrides, args.grad_accum), "bench"
    if args.batch is not None:
        if args.batch < 1 or any(args.batch % c.grad_accum for c in cases):
            raise SystemExit(f"--batch must be a positive multiple of the micro-batch count "
                             f"({cases[0].grad_accum}), got {args.batch}")
        cases = [dataclasses.replace(c, batch=args.batch) for c in cases]
    if args.case:
        cases = [c for c in cases if args.case in c.name]
        if not cases:
            raise SystemExit(f"--case {args.case!r} matches no case")
    if args.peers is not None:
        peers = () if args.peers == "none" else tuple(p for p in args.peers.split(",") if p)
        unknown = set(peers) - set(PEER_VARIANTS)
        if unknown:
            raise SystemExit(f"unknown peer variant(s) {sorted(unknown)}; choose from {PEER_VARIANTS}")
    elif on_gpu:
        peers = ("eager", "compile", "compile-step")
    elif args.device_check or args.torch_compile_cpu:
        peers = ("eager", "compile", "compile-step")
    else:
        peers = ("eager",)
    if not on_gpu and "max-autotune" in peers:
        raise SystemExit("the max-autotune peer tunes GPU kernels: GPU only")
    if not on_gpu and set(peers) & set(COMPILED_PEERS) and not os.environ.get("OMP_WAIT_POLICY"):
        # inductor's C++ kernels bring their own OpenMP pool, which spins after each
        # kernel; beside torch's and XLA's pools every peer then runs ~30x slower here
        print("note: compiled peers on the CPU; time them with OMP_WAIT_POLICY=PASSIVE "
              "(the losses are checked either way)", flush=True)
    if peers and any(p in COMPILED_PEERS for p in peers):
        # one compiled module per peer and case: more than Dynamo's default allowance
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(64, getattr(torch._dynamo.config, knob)))
    name = args.out or (name + (f"-{args.threads}core" if args.threads else "")
                        + (f"-b{args.batch}" if args.batch else ""))

    tc = TrainConfig(lr=3e-4, warmup_steps=0, total_steps=10_000, grad_clip=1.0)
    info = machine_info(on_gpu)
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    info["reuse_host_memory"] = reused
    print(f"machine: {info}", flush=True)
    rate = matmul_rate(on_gpu)
    print(f"matmul {rate['n']}^3 {rate['dtype']}: jax {rate['jax'] / 1e9:.1f} GFLOP/s, "
          f"torch {rate['torch'] / 1e9:.1f} GFLOP/s", flush=True)
    peak = next((v for k, v in DATASHEET_BF16.items() if on_gpu and k in info.get("gpu", "")), None)
    if args.products_only:
        for case in cases:
            for r in layer_product_rates(case, on_gpu):
                print(f"  {case.name} {r['layer']} {'x'.join(map(str, r['shape']))} {r['dtype']}: "
                      f"jax {r['jax'] / 1e9:.1f} GFLOP/s, torch {r['torch'] / 1e9:.1f} GFLOP/s",
                      flush=True)
        return 0

    rows, results = [], []
    for case in cases:
        trace = (str(results_dir(name) / f"trace-{re.sub(r'[^A-Za-z0-9]+', '-', case.name)}")
                 if args.profile else None)
        case_peers = peers if args.peers is not None or case.peers is None else case.peers
        print(f"benchmarking {case.name} against {', '.join(case_peers) or 'no peer'} ...",
              flush=True)
        r = bench_case(case, tc, args.steps, args.repeats, on_gpu, case_peers, profile_dir=trace)
        fpt = r["flops_per_token"]
        tps = {"jax": r["jax_tokens_per_s"], "torch": r["torch_tokens_per_s"] or 0.0}
        r["mfu_measured"] = {k: v * fpt / rate["best"] for k, v in tps.items()}
        r["mfu_datasheet"] = {k: v * fpt / peak for k, v in tps.items()} if peak else None
        r["floor_step_s"] = fpt * case.batch * case.seq / rate["best"]
        for p in r["peers"].values():
            p["mfu_measured"] = p["tokens_per_s"] * fpt / rate["best"]
        results.append(r)
        best = r["torch_peer"]
        others = "; ".join([f"{n} {p['tokens_per_s']:.0f} ({p['ratio']:.2f}x)"
                            for n, p in r["peers"].items() if n != best]
                           + [f"{n} failed" for n in r["peer_errors"]]) or "-"
        row = [case.name, case.batch, case.seq, round(r["jax_tokens_per_s"]),
               f"{r['torch_tokens_per_s']:.0f} ({best})" if best else "-",
               f"{r['ratio']:.2f}x ({r['pair_ratios'][0]:.2f}-{r['pair_ratios'][-1]:.2f})"
               if best else "-", others,
               f"{100 * r['mfu_measured']['jax']:.1f}% / {100 * r['mfu_measured']['torch']:.1f}%"]
        if peak:
            row.append(f"{100 * r['mfu_datasheet']['jax']:.1f}% / {100 * r['mfu_datasheet']['torch']:.1f}%")
        diff = max((p["loss_diff"] for p in r["peers"].values()), default=0.0)
        row.append(f"{r['first_loss_jax']:.4f} / " + (f"{r['first_loss_torch']:.4f}" if best else "-"))
        row.append(f"{diff:.1e} " + ("ok" if r["losses_equal"] else f"OVER {r['loss_tolerance']:g}"))
        row.append(f"{r['page_faults_per_step']['jax']:.0f} / "
                   + (f"{r['page_faults_per_step']['torch']:.0f}" if best else "-"))
        rows.append(row)
        print(f"  jaxllm {r['jax_tokens_per_s']:.0f} tok/s"
              + (f", fastest peer {best} {r['torch_tokens_per_s']:.0f} tok/s, ratio {r['ratio']:.2f} "
                 f"(repeats {r['pair_ratios'][0]:.2f}-{r['pair_ratios'][-1]:.2f}); others: {others}"
                 if best else "")
              + f"; warm-up rounds {r['warmup_rounds']}", flush=True)

    ran = sorted({p for r in results for p in r["peers"]}, key=PEER_VARIANTS.index)
    recipe = ("bf16 autocast, fused AdamW, clip_grad_norm_(foreach)" if cases[0].gpu_recipe
              else "float32")
    headers = ["case", "batch", "seq", "jaxllm tok/s", "fastest torch peer tok/s",
               "jaxllm/fastest", "other peers tok/s (jaxllm/peer)",
               "MFU vs measured matmul (jax / fastest)"]
    if peak:
        headers.append("MFU vs datasheet (jax / fastest)")
    headers += ["first-step loss (jax / fastest)", "max first-two-loss diff",
                "page faults/step (jax / fastest)"]
    impl = {k: cases[0].config.to_dict()[k] for k in
            ("attn_impl", "matmul_impl", "norm_impl", "loss_impl", "param_dtype", "compute_dtype",
             "scan_layers", "remat", "vocab_multiple")}
    impl["grad_accum"] = cases[0].grad_accum
    md = (f"# Training throughput: jaxllm vs PyTorch\n\n"
          f"Machine: {info.get('gpu', info['cpu'])}, nproc {info['nproc']}, jax {info['jax']} "
          f"({info['jax_backend']}), torch {info['torch']} ({info['torch_threads']} threads), "
          f"{info['cores']} core(s) for both; malloc "
          + ("reusing freed memory (`jaxllm.reuse_host_memory`)" if reused else "with glibc's defaults")
          + ", one process for both.\n"
          f"Matmul rate ({rate['n']}^3 {rate['dtype']}): {rate['best'] / 1e9:.1f} GFLOP/s "
          f"(jax {rate['jax'] / 1e9:.1f}, torch {rate['torch'] / 1e9:.1f})"
          + (f"; datasheet peak {peak / 1e12:.0f} TFLOP/s" if peak else "") + ".\n"
          f"jaxllm implementation: {impl}. AdamW, grad clip {tc.grad_clip}, "
          f"{args.repeats} blocks of {args.steps} steps each, interleaved: tokens/s are medians "
          f"over the blocks, jaxllm/torch the median of the {args.repeats} neighbouring pairs' "
          f"ratios (their range in brackets).\n"
          f"torch peers ({recipe}; the loss computed inside the module, vocabulary padded and "
          f"head tied as jaxllm's): {', '.join(ran) or 'none'}; the fastest is the ratio's "
          f"denominator. Loss diff: the largest |torch - jaxllm| over the first two steps' "
          f"losses (before and after one AdamW step), tolerance {loss_tolerance(cases[0]):g}.\n\n"
          + markdown_table(headers, rows))
    for r in results:
        if r["profile"]:
            md += (f"\n## Costliest XLA ops of jaxllm's step: {r['case']}\n\n"
                   "jax.profiler, time per step summed over each op's calls"
                   + ("" if on_gpu else "; on the CPU the products run on the thread pool while "
                      "other ops' events are open, so these are proportions, not wall time")
                   + ".\n\n" + markdown_table(
                       ["op", "ms/step", "calls/step", "share", "shape", "source"],
                       [[p["op"], f"{p['ms_per_step']:.2f}", f"{p['calls_per_step']:g}",
                         f"{100 * p['share']:.1f}%", p["shape"], p["source"][-60:]]
                        for p in r["profile"]]))
    unequal = [(r["case"], n, p["loss_diff"]) for r in results for n, p in r["peers"].items()
               if not p["losses_equal"]]
    for case_name, peer, diff in unequal:
        print(f"LOSSES DIFFER: {case_name}, peer {peer}: |diff| {diff:.2e} over "
              f"{loss_tolerance(cases[0]):g}", flush=True)
    failed = [(r["case"], n, e) for r in results for n, e in r["peer_errors"].items()]
    for case_name, peer, err in failed:
        print(f"PEER FAILED: {case_name}, peer {peer}: {err[:300]}", flush=True)
    write_report(name, {"machine": info, "matmul": rate, "datasheet_peak": peak,
                        "train_config": dataclasses.asdict(tc), "default_peers": list(peers),
                        "results": results}, md)
    return 1 if unequal or failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
