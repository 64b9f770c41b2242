"""Training throughput: jaxllm's train step against a PyTorch peer of the same model.

    python -m experiments.bench_train                 # CPU: the issue's config and the small preset
    python -m experiments.bench_train --gpu           # GPU: GPT-2 124M, bf16, context 1024, batch 16
    python -m experiments.bench_train --device-check  # the GPU recipe on a tiny config, any device
    python -m experiments.bench_train --threads 1     # both pinned to one core
    python -m experiments.bench_train --profile       # and a per-op profile of jaxllm's step

Both sides train the same model from the same weights on the same batch:
jaxllm through `make_train_step` (AdamW from `make_optimizer`, global-norm
clipping on), PyTorch through the `TorchGPT` module below with `torch.optim.AdamW`
and `clip_grad_norm_`. On CPU PyTorch runs eagerly in float32 with its fused
`scaled_dot_product_attention`; on GPU it gets `torch.compile`, bf16 autocast
and fused AdamW. The two are timed interleaved (a block of steps of one, then
of the other, alternating which goes first) because the machine is shared
and its speed drifts. Tokens/s are medians over the repeats; the ratio is the
median of the repeats' own ratios (each repeat's two neighbouring blocks), so
a slowdown that spans a pair of blocks cancels.

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
import math
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


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark row: a model, a batch shape and the precision recipe."""

    name: str
    config: GPTConfig
    batch: int
    seq: int
    gpu_recipe: bool = False  # bf16 compute; torch.compile + autocast + fused AdamW
    grad_accum: int = 1  # jaxllm's micro-batches per step (same batch, same mean gradient)


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
                 grad_accum=accum)]


def gpu_cases(overrides: dict) -> list[Case]:
    fast = dict(compute_dtype="bfloat16", param_dtype="float32", drop_rate=0.0,
                attn_impl="cudnn", vocab_multiple=128)
    return [Case("gpt2-124m bf16 T1024 B16", get_preset("gpt2-124m").replace(**{**fast, **overrides}),
                 16, 1024, gpu_recipe=True)]


def device_check_cases(overrides: dict, on_gpu: bool) -> list[Case]:
    tiny = GPTConfig(vocab_size=100, context_length=64, emb_dim=64, n_heads=4, n_layers=2,
                     drop_rate=0.0, compute_dtype="bfloat16", vocab_multiple=128,
                     attn_impl="cudnn" if on_gpu else "xla")
    return [Case("device-check tiny bf16", tiny.replace(**overrides), 4, 64, gpu_recipe=True)]


# -- the PyTorch peer ----------------------------------------------------------
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
    """GPT-2 in PyTorch with jaxllm's parameter layout and math (no dropout)."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.tied = c.tie_embeddings
        self.tok_emb = nn.Embedding(c.vocab_size, c.emb_dim)
        self.pos_emb = nn.Embedding(c.context_length, c.emb_dim)
        self.blocks = nn.ModuleList(TorchBlock(c) for _ in range(c.n_layers))
        self.final_norm = nn.LayerNorm(c.emb_dim, eps=c.ln_eps)
        if not self.tied:
            self.out_head = nn.Linear(c.emb_dim, c.vocab_size, bias=False)

    def forward(self, tokens):
        x = self.tok_emb(tokens) + self.pos_emb(torch.arange(tokens.shape[1], device=tokens.device))
        for blk in self.blocks:
            x = blk(x)
        x = self.final_norm(x)
        w = self.tok_emb.weight if self.tied else self.out_head.weight
        return x @ w.T

    @torch.no_grad()
    def load_jaxllm(self, params, c: GPTConfig) -> "TorchGPT":
        """Copy a jaxllm parameter tree in (kernels transposed, vocabulary padding dropped)."""
        def put(dst, src, transpose=False):
            a = torch.from_numpy(np.array(jnp.asarray(src, jnp.float32)))
            dst.copy_(a.T if transpose else a)

        put(self.tok_emb.weight, params["tok_emb"]["embedding"][: c.vocab_size])
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
            put(self.out_head.weight, params["out_head"]["kernel"][:, : c.vocab_size], transpose=True)
        return self


def torch_optimizer(model: nn.Module, tc: TrainConfig, fused: bool):
    """AdamW with decay on matrices only (not embeddings), like `make_optimizer`."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "emb" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=tc.eps,
                             fused=fused or None)


def make_torch_step(model, opt, tc: TrainConfig, autocast_device: str | None):
    def step(x, y):
        ctx = (torch.autocast(autocast_device, dtype=torch.bfloat16) if autocast_device
               else contextlib.nullcontext())
        with ctx:
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        return loss.detach()
    return step


# -- measurements ----------------------------------------------------------------
def flops_per_token(c: GPTConfig, seq: int) -> float:
    """6N + 12*L*H*Q*T, N counting the weights that enter matrix products."""
    real = c.replace(vocab_multiple=1)
    n = count_params(real) - c.context_length * c.emb_dim  # position table: a lookup
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
               profile_dir: str | None = None) -> dict:
    c = case.config
    key = jax.random.key(0)
    params = init_params(c, key)
    rng = np.random.default_rng(0)
    data = rng.integers(0, c.vocab_size, size=(case.batch, case.seq + 1))
    inputs, targets = jnp.asarray(data[:, :-1]), jnp.asarray(data[:, 1:])

    dev = "cuda" if on_gpu else "cpu"
    model = TorchGPT(c).load_jaxllm(params, c).to(dev)
    topt = torch_optimizer(model, tc, fused=case.gpu_recipe)
    fwd = torch.compile(model) if case.gpu_recipe else model
    tstep = make_torch_step(fwd, topt, tc, dev if case.gpu_recipe else None)
    tx = torch.from_numpy(data[:, :-1]).to(dev)
    ty = torch.from_numpy(data[:, 1:]).to(dev)

    jtc = tc.replace(grad_accum=case.grad_accum)
    optimizer = make_optimizer(jtc)
    jstep = make_train_step(c, jtc, optimizer)
    state = init_train_state(params, jtc, optimizer)

    # First step from identical weights: the losses must agree (same model, same batch).
    t0 = time.perf_counter()
    batch = {"tokens": inputs, "targets": targets}
    state, metrics = jstep(state, batch)
    jax_first = float(metrics["loss"])
    jax_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch_first = float(tstep(tx, ty))
    torch_compile = time.perf_counter() - t0

    def run_jax():
        nonlocal state
        for _ in range(steps):
            state, m = jstep(state, batch)
        m["loss"].block_until_ready()

    def run_torch():
        for _ in range(steps):
            loss = tstep(tx, ty)
        float(loss)  # waits for the device

    # Warm-up until the heap has settled: for its first few dozen steps a
    # process's heap still grows now and then, when a step's scratch space finds
    # no free block it fits in, and that step touches 20-70 thousand fresh pages
    # (NOTES.md, v7 and v10). The timed blocks start after SETTLED_ROUNDS rounds
    # in a row in which the two frameworks together touched at most
    # SETTLED_PAGES fresh pages a step.
    clean = warmup = 0
    while clean < SETTLED_ROUNDS and warmup < MAX_WARMUP_ROUNDS:
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        run_jax(), run_torch()
        touched = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        clean = clean + 1 if touched <= SETTLED_PAGES * steps else 0
        warmup += 1
    jax_t, torch_t = [], []
    faults = {run_jax: 0, run_torch: 0}  # minor page faults: fresh memory the step touched
    for r in range(repeats):
        order = ((run_jax, jax_t), (run_torch, torch_t))
        for fn, out in (order if r % 2 == 0 else order[::-1]):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
            faults[fn] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
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
    jax_tps = tokens / statistics.median(jax_t)
    torch_tps = tokens / statistics.median(torch_t)
    # The ratio from each repeat's pair of neighbouring blocks, then the median:
    # a slowdown of the machine that spans both blocks of a pair cancels out.
    pair_ratios = sorted(t / j for j, t in zip(jax_t, torch_t))
    return {"case": case.name, "config": c.to_dict(), "batch": case.batch, "seq": case.seq,
            "grad_accum": case.grad_accum,
            "steps_per_repeat": steps, "repeats": repeats,
            "jax_tokens_per_s": jax_tps, "torch_tokens_per_s": torch_tps,
            "ratio": statistics.median(pair_ratios), "pair_ratios": pair_ratios,
            "ratio_of_medians": jax_tps / torch_tps, "jax_step_s": sorted(t / steps for t in jax_t),
            "torch_step_s": sorted(t / steps for t in torch_t),
            "page_faults_per_step": {"jax": faults[run_jax] / (steps * repeats),
                                     "torch": faults[run_torch] / (steps * repeats)},
            "warmup_rounds": warmup, "first_loss_jax": jax_first, "first_loss_torch": torch_first,
            "compile_s": {"jax": jax_compile, "torch": torch_compile},
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
        print(f"benchmarking {case.name} ...", flush=True)
        trace = (str(results_dir(name) / f"trace-{re.sub(r'[^A-Za-z0-9]+', '-', case.name)}")
                 if args.profile else None)
        r = bench_case(case, tc, args.steps, args.repeats, on_gpu, profile_dir=trace)
        fpt = r["flops_per_token"]
        r["mfu_measured"] = {k: r[f"{k}_tokens_per_s"] * fpt / rate["best"] for k in ("jax", "torch")}
        r["mfu_datasheet"] = ({k: r[f"{k}_tokens_per_s"] * fpt / peak for k in ("jax", "torch")}
                              if peak else None)
        r["floor_step_s"] = fpt * case.batch * case.seq / rate["best"]
        results.append(r)
        row = [case.name, case.batch, case.seq, round(r["jax_tokens_per_s"]),
               round(r["torch_tokens_per_s"]),
               f"{r['ratio']:.2f}x ({r['pair_ratios'][0]:.2f}-{r['pair_ratios'][-1]:.2f})",
               f"{100 * r['mfu_measured']['jax']:.1f}% / {100 * r['mfu_measured']['torch']:.1f}%"]
        if peak:
            row.append(f"{100 * r['mfu_datasheet']['jax']:.1f}% / {100 * r['mfu_datasheet']['torch']:.1f}%")
        row.append(f"{r['first_loss_jax']:.4f} / {r['first_loss_torch']:.4f}")
        row.append(f"{r['page_faults_per_step']['jax']:.0f} / {r['page_faults_per_step']['torch']:.0f}")
        rows.append(row)
        print(f"  jaxllm {r['jax_tokens_per_s']:.0f} tok/s, torch {r['torch_tokens_per_s']:.0f} tok/s, "
              f"ratio {r['ratio']:.2f} (repeats {r['pair_ratios'][0]:.2f}-{r['pair_ratios'][-1]:.2f}), "
              f"warm-up rounds {r['warmup_rounds']}, page faults/step {r['page_faults_per_step']['jax']:.0f} / "
              f"{r['page_faults_per_step']['torch']:.0f}", flush=True)

    torch_mode = "torch.compile + bf16 autocast + fused AdamW" if cases[0].gpu_recipe else "eager float32"
    headers = ["case", "batch", "seq", "jaxllm tok/s", f"torch tok/s ({torch_mode})",
               "jaxllm/torch", "MFU vs measured matmul (jax / torch)"]
    if peak:
        headers.append("MFU vs datasheet (jax / torch)")
    headers += ["first-step loss (jax / torch)", "page faults/step (jax / torch)"]
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
          f"ratios (their range in brackets).\n\n"
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
    write_report(name, {"machine": info, "matmul": rate, "datasheet_peak": peak,
                        "train_config": dataclasses.asdict(tc), "results": results}, md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
