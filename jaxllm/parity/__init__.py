"""jaxllm against PyTorch and `transformers`, as checks that report their figures.

Each check builds a small random model (or the seed's worked examples), runs
the same computation in jaxllm and in PyTorch, and returns its comparisons:
what was compared, the largest difference, and the tolerance it must stay
within. `jaxllm parity` (and `make parity`) runs every registered check and
writes `results/parity/results.md` and `results.json`; the tests in `tests/`
call the same check functions and assert on the comparisons they return, so
the report and the test suite cannot disagree.

One file per area, each imported by `load_checks()`:

* `basics.py`: the seed's examples (tensors, one neuron's gradients, SimpleNet's SGD steps);
* `gpt2.py`: GPT-2 against `transformers.GPT2LMHeadModel`: logits, loss, every
  gradient, AdamW steps, greedy tokens, the weight conversion;
* `families.py`: Llama 3 and Qwen3 against transformers: logits, loss, every gradient,
  greedy tokens, save_hf read back;
* `finetune.py`: classifier AdamW steps, masked instruction loss, gradients and steps;
* `lora.py`: LoRA against an independent PyTorch LoRA (logits, adapter gradients, AdamW steps);
* `dpo.py`: the DPO loss against its formula in torch, AdamW steps against a torch DPO;
* `reference.py`: the PyTorch side shared by the areas (random parameters, a
  `GPT2LMHeadModel` holding jaxllm's weights); it registers nothing.

Adding a check is one function in an area file (a new file here is a new area,
found without a list to edit; `AREA_ORDER` places it in the report, else it
comes last)::

    from jaxllm.parity import Comparison, close, register, require

    @register("llama: logits (MHA)", n_kv_heads=4)  # one line per variant in the report,
    @register("llama: logits", n_kv_heads=2)        # the lowest listed first
    def llama_logits(n_kv_heads: int) -> list[Comparison]:
        ours, theirs = ...                          # jaxllm's and transformers' logits
        require(theirs.std() > 0, "the reference logits are constant")
        return [close("logits", (ours, theirs), atol=1e-5)]

and its test calls it: ``assert_passed(llama_logits(2))``. `close`, `within`,
`relative` and `exact` compare arrays (or ``{name: (ours, theirs)}`` dicts,
naming the worst entry); `require` states what must hold for the comparison
to mean something (the steps learn, a gradient is not zero): it raises
`CheckFailed`, which the report shows as a failed check. PyTorch is imported
by the area files only, so `import jaxllm.parity` works without it.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
import time
import traceback
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

__all__ = ["CHECKS", "Check", "CheckFailed", "Comparison", "Outcome", "assert_passed", "close",
           "exact", "load_checks", "register", "relative", "require", "run_checks", "within",
           "write_report"]


class CheckFailed(AssertionError):
    """A condition without which a comparison would mean nothing did not hold."""


def require(condition: Any, message: str) -> None:
    """Raise `CheckFailed(message)` unless `condition` holds."""
    if not condition:
        raise CheckFailed(message)


@dataclass(frozen=True)
class Comparison:
    """One quantity compared: its largest difference, the tolerance, and whether it passed.

    `measure` says how `difference` was taken (the largest absolute difference, a relative norm);
    `rtol`, when not 0, adds rtol * |reference| to the tolerance entry by entry
    (numpy's allclose rule), so `passed` is computed from the entries, not from
    `difference` alone. `where` names the worst entry of several (a parameter, a step).
    """

    quantity: str
    difference: float
    tolerance: float
    passed: bool
    measure: str = "max abs diff"
    rtol: float = 0.0
    where: str = ""

    def describe(self) -> str:
        tol = f"{self.tolerance:.1e}" + (f" + {self.rtol:.0e}·|ref|" if self.rtol else "")
        at = f" at {self.where}" if self.where else ""
        return (f"{self.quantity}: {self.measure} {self.difference:.3g}{at}, tolerance {tol}: "
                + ("ok" if self.passed else "FAILED"))


def _pairs(pairs) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if isinstance(pairs, Mapping):
        items = pairs.items()
    else:
        items = [("", pairs)]
    out = {}
    for name, (ours, theirs) in items:
        a = np.asarray(ours, np.float64)
        b = np.asarray(theirs, np.float64)
        require(a.shape == b.shape, f"{name or 'the result'}: shape {a.shape} against {b.shape}")
        out[name] = (a, b)
    require(out, "nothing to compare")
    return out


def _worst(values: dict[str, float]) -> tuple[str, float]:
    """The entry with the largest value (NaN first); no name when nothing differs."""
    name = max(values, key=lambda k: (np.isnan(values[k]), values[k]))
    return (name if values[name] != 0 else ""), values[name]


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a - b), initial=0.0))


def close(quantity: str, pairs, *, atol: float, rtol: float = 0.0) -> Comparison:
    """Entry by entry |ours - theirs| <= atol + rtol * |theirs| (numpy.testing.assert_allclose)."""
    p = _pairs(pairs)
    where, diff = _worst({k: _max_abs(a, b) for k, (a, b) in p.items()})
    passed = all(bool(np.all(np.abs(a - b) <= atol + rtol * np.abs(b))) for a, b in p.values())
    return Comparison(quantity, diff, atol, passed, rtol=rtol, where=where)


def within(quantity: str, pairs, tol: float) -> Comparison:
    """The largest |ours - theirs| strictly below `tol`."""
    where, diff = _worst({k: _max_abs(a, b) for k, (a, b) in _pairs(pairs).items()})
    return Comparison(quantity, diff, tol, bool(diff < tol), where=where)


def relative(quantity: str, pairs, tol: float) -> Comparison:
    """||ours - theirs|| / ||theirs|| per tensor (Frobenius norms), the largest strictly below `tol`.

    One number per tensor, insensitive to the entries near zero, where an
    entrywise relative error means nothing.
    """
    def err(a, b):
        return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))

    where, diff = _worst({k: err(a, b) for k, (a, b) in _pairs(pairs).items()})
    return Comparison(quantity, diff, tol, bool(diff < tol), measure="relative error",
                      where=where)


def exact(quantity: str, pairs) -> Comparison:
    """Bit for bit equal (same shape, same values)."""
    p = _pairs(pairs)
    where, diff = _worst({k: _max_abs(a, b) for k, (a, b) in p.items()})
    passed = all(np.array_equal(a, b) for a, b in p.values())
    return Comparison(quantity, diff, 0.0, passed, where=where)


def assert_passed(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """Fail (AssertionError naming each failed comparison) unless every one passed."""
    assert comparisons, "the check compared nothing"
    failed = [c.describe() for c in comparisons if not c.passed]
    assert not failed, "; ".join(failed)
    return list(comparisons)


# -- the registry -----------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """A named check: `function(**kwargs)` returns its comparisons."""

    name: str
    function: Callable[..., list[Comparison]]
    kwargs: dict[str, Any]

    @property
    def area(self) -> str:
        return self.function.__module__.rpartition(".")[2]

    def __call__(self) -> list[Comparison]:
        return self.function(**self.kwargs)


CHECKS: dict[str, Check] = {}


def register(name: str, **kwargs: Any) -> Callable:
    """Decorator: register `function(**kwargs)` as the check `name` (stack it for variants).

    The function is returned unchanged, for the tests to call with any arguments.
    """
    def decorate(function: Callable[..., list[Comparison]]) -> Callable:
        def origin(f):
            return f.__module__, f.__qualname__

        if name in CHECKS and origin(CHECKS[name].function) != origin(function):
            raise ValueError(f"a parity check named {name!r} is already registered "
                             f"({CHECKS[name].function.__module__}.{CHECKS[name].function.__name__})")
        CHECKS[name] = Check(name, function, dict(kwargs))
        return function

    return decorate


# The report's order; an area not named here follows, alphabetically.
AREA_ORDER = ("basics", "gpt2", "families", "finetune", "lora", "dpo")


def load_checks() -> dict[str, Check]:
    """Import every area module of this package (registering its checks); all the
    checks, area by area in `AREA_ORDER`.

    Raises ImportError when PyTorch or transformers is missing.
    """
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    rank = {area: i for i, area in enumerate(AREA_ORDER)}
    ordered = sorted(CHECKS.values(), key=lambda c: (rank.get(c.area, len(rank)), c.area))
    return {c.name: c for c in ordered}


# -- running and reporting ----------------------------------------------------------
@dataclass
class Outcome:
    check: str
    area: str
    comparisons: list[Comparison]
    seconds: float
    error: str | None = None

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.comparisons) and all(
            c.passed for c in self.comparisons)


def select(patterns: Iterable[str] | None = None) -> list[Check]:
    """The registered checks whose name or area matches one of the shell-style
    `patterns` (case-insensitive; a bare word matches names containing it); all without."""
    checks = list(load_checks().values())
    patterns = [p.lower() for p in patterns or ()]
    if not patterns:
        return checks

    def matches(check: Check, pattern: str) -> bool:
        glob = pattern if any(ch in pattern for ch in "*?[") else f"*{pattern}*"
        return fnmatch(check.name.lower(), glob) or fnmatch(check.area, glob)

    return [c for c in checks if any(matches(c, p) for p in patterns)]


def run_checks(checks: Iterable[Check], progress: Callable[[Outcome], None] | None = None
               ) -> list[Outcome]:
    """Run each check; an exception is its failure (recorded, and the rest still run)."""
    outcomes = []
    for check in checks:
        start = time.perf_counter()
        try:
            comparisons, error = list(check()), None
        except Exception as e:  # noqa: BLE001 - a crashing check is a failed check
            comparisons = []
            error = f"{type(e).__name__}: {e}" if isinstance(e, CheckFailed) else \
                "".join(traceback.format_exception_only(type(e), e)).strip()
        if error is None and not comparisons:
            error = "the check compared nothing"
        outcome = Outcome(check.name, check.area, comparisons, time.perf_counter() - start, error)
        outcomes.append(outcome)
        if progress is not None:
            progress(outcome)
    return outcomes


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for package in ("jax", "jaxlib", "torch", "transformers", "numpy"):
        try:
            out[package] = md.version(package)
        except md.PackageNotFoundError:
            out[package] = "not installed"
    return out


def _tolerance_text(c: Comparison) -> str:
    text = f"{c.tolerance:.0e}" if c.tolerance else ("0 (exact)" if not c.rtol else "0")
    return text + (f" + {c.rtol:.0e}·|ref|" if c.rtol else "")


def report_markdown(outcomes: Sequence[Outcome], versions: Mapping[str, str]) -> str:
    n_failed = sum(not o.passed for o in outcomes)
    lines = ["# Parity: jaxllm against PyTorch and transformers", "",
             "Small random models (every leaf drawn at random, float32) and the seed's examples, "
             "computed by jaxllm and by PyTorch. Each row is one comparison: the largest "
             "difference found and the tolerance it must stay within (a relative error is "
             "||ours - torch|| / ||torch|| per tensor).", "",
             ", ".join(f"{k} {v}" for k, v in versions.items()), "",
             f"**{len(outcomes) - n_failed} of {len(outcomes)} checks passed.**", "",
             "| check | compared | measure | largest difference | tolerance | worst at | result |",
             "|---|---|---|---|---|---|---|"]
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    for o in outcomes:
        if o.error is not None:
            lines.append(f"| {cell(o.check)} | {cell(o.error)} | | | | | **FAILED** |")
            continue
        for c in o.comparisons:
            lines.append(f"| {cell(o.check)} | {cell(c.quantity)} | {cell(c.measure)} | "
                         f"{c.difference:.2e} | {cell(_tolerance_text(c))} | {cell(c.where)} | "
                         f"{'ok' if c.passed else '**FAILED**'} |")
    return "\n".join(lines) + "\n"


def _finite(value: Any) -> Any:
    """NaN and infinities as the strings "nan", "inf", "-inf" (strict JSON has no such numbers)."""
    if isinstance(value, float) and not np.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write_report(outcomes: Sequence[Outcome], out_dir: Path) -> tuple[Path, Path]:
    """results.md and results.json in `out_dir`; their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    versions = _versions()
    data = {"passed": all(o.passed for o in outcomes), "versions": versions,
            "checks": [{"check": o.check, "area": o.area, "passed": o.passed, "error": o.error,
                        "seconds": round(o.seconds, 3),
                        "comparisons": [dataclasses.asdict(c) for c in o.comparisons]}
                       for o in outcomes]}
    md, js = out_dir / "results.md", out_dir / "results.json"
    md.write_text(report_markdown(outcomes, versions))
    js.write_text(json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")
    return md, js
