"""Data parallelism and FSDP with JAX's SPMD machinery.

A `jax.sharding.Mesh` lays the devices out on two named axes:

* ``data``: each slice along it holds a full copy of the (FSDP-sharded) state
  and sees its own part of the batch (plain data parallelism);
* ``fsdp``: parameters and optimizer moments are split along it (ZeRO-3 /
  fully sharded data parallelism), and the batch is split along it too.

So the batch is split over every device, ``P(("data", "fsdp"))``, and each
parameter over the ``fsdp`` axis as the partition rules say. The train step
is the plain step of `jaxllm.train.step` under `jax.jit` with those input and
output shardings; XLA's SPMD partitioner inserts the all-gathers of
parameters and the reduce-scatters of gradients. On one device every mesh
axis has size 1 and the sharded step computes what the plain one does.

Partition rules are data: an ordered list of ``(regex, PartitionSpec)``. A
parameter's path is its keys joined by "/", e.g. ``blocks/3/attn/qkv/kernel``;
the first rule whose regex matches the whole path gives its spec. A parameter
that no rule matches (a new head, adapters) is replicated, with one warning
that lists them all; with ``strict=True`` it is an error, and so is a rule that
matches no parameter (the default rules name ``out_head`` and ``qkv`` biases,
which some configs do not have; a rule of another family than the tree's is not
counted). Optimizer state follows the parameters: a
leaf of an optax state whose key path ends with a parameter's path and has
its shape (Adam's ``mu`` and ``nu``, momentum traces, over all parameters or
only the trainable ones) gets that parameter's sharding; other leaves (step
counts) are replicated.

Several hosts: call `initialize_distributed` first on every host (see its
docstring for the command line); the mesh then spans every process's devices,
and `shard_batch` builds each global batch from the rows each host loaded.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxllm import layout
from jaxllm.config import NATIVE_KERNEL_FIELDS, GPTConfig
from jaxllm.model import init_params
from jaxllm.train.optim import TrainConfig, make_optimizer
from jaxllm.train.step import TrainState, init_train_state, make_eval_step, make_train_step
from jaxllm.train.task import Task, Trainable, lm_task, path_str  # path_str: re-exported

MESH_AXES = ("data", "fsdp")
# The batch dimension is split over every device: data parallel across
# `data`, and across `fsdp` as well (each FSDP shard trains on its own rows).
BATCH_AXES = ("data", "fsdp")
BATCH_SPEC = P(BATCH_AXES)

# A rule is (regex over the parameter path, spec); the spec is a PartitionSpec
# or a tuple of them tried in order, the first whose sharded dimensions divide.
Rules = Sequence[tuple[str, "P | tuple[P, ...]"]]

# A matrix is split along its rows (the input dimension of a dense kernel, the
# token ids of an embedding) when they divide, else along its columns. Rows
# first because XLA then gathers the weight before the matmul and keeps the
# activations split by batch; splitting the output dimension of the kernels
# pushes the weight's split into the activations (on 8 devices the tiny test
# model's step compiled to 58 all-gathers and 34 all-to-alls instead of 10
# all-gathers). GPT-2's vocabulary (50257) divides by nothing, so its
# embedding and head fall back to the model width unless
# `GPTConfig.vocab_multiple` pads it.
FSDP_MATRIX = (P("fsdp", None), P(None, "fsdp"))

# The default FSDP layout of every family's parameters (see `param_specs`), one rule
# per matrix of `jaxllm.layout`'s tables in tree order (GPT-2's, then Llama's and
# Qwen3's), then one for the vectors (biases, norm scales: at most a few thousand
# numbers), which are replicated.
DEFAULT_RULES: tuple[tuple[str, P | tuple[P, ...]], ...] = tuple(
    (regex, FSDP_MATRIX if kind == layout.MATRIX else P()) for regex, kind in layout.rule_patterns())
_RULE_FAMILIES = layout.rule_families()


# -- the mesh ------------------------------------------------------------------
def parse_mesh_spec(spec: str, num_devices: int | None = None) -> dict[str, int]:
    """Parse ``"data=2,fsdp=4"`` into ``{"data": 2, "fsdp": 4}`` (in `MESH_AXES` order).

    Axes left out have size 1. One axis may be -1: it takes the devices the
    others leave (``"data=2,fsdp=-1"`` on 8 devices is data=2, fsdp=4), which
    needs `num_devices`. An empty spec means ``fsdp=-1``.
    """
    if not isinstance(spec, str):
        raise ValueError(f"mesh spec must be a string like 'data=2,fsdp=4', got {spec!r}")
    sizes: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in (spec.strip() or "fsdp=-1").split(","))):
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq:
            raise ValueError(f"mesh spec {spec!r}: expected AXIS=SIZE, got {part!r}")
        if name not in MESH_AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {MESH_AXES}")
        if name in sizes:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be an int, got {value!r}") from None
        if size == 0 or size < -1:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be positive or -1, got {size}")
        sizes[name] = size
    rest = [n for n, s in sizes.items() if s == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1, got {rest}")
    if rest:
        if num_devices is None:
            raise ValueError(f"mesh spec {spec!r}: resolving -1 needs the device count")
        known = math.prod(s for s in sizes.values() if s != -1)
        if num_devices % known:
            raise ValueError(f"mesh spec {spec!r}: {num_devices} devices do not divide by the "
                             f"other axes' product {known}")
        sizes[rest[0]] = num_devices // known
    return {name: sizes.get(name, 1) for name in MESH_AXES}


def make_mesh(spec: str | dict[str, int] = "", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes `MESH_AXES` over `devices` (default: every global device).

    The product of the axis sizes must equal the device count: a mesh that
    would leave devices idle is an error rather than a silent subset.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices)) if isinstance(spec, str) else \
        parse_mesh_spec(",".join(f"{k}={v}" for k, v in spec.items()), len(devices))
    shape = tuple(sizes[a] for a in MESH_AXES)
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh {sizes} has {math.prod(shape)} devices but there are "
                         f"{len(devices)}; the axis sizes must multiply to the device count")
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def mesh_description(mesh: Mesh) -> str:
    """``"data=2,fsdp=4"``: the spec string that rebuilds this mesh's shape."""
    return ",".join(f"{a}={s}" for a, s in mesh.shape.items())


# -- partition rules -----------------------------------------------------------
def _compile_rules(rules: Rules) -> list[tuple[str, re.Pattern, tuple[P, ...]]]:
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise ValueError(f"partition rule #{i} must be (regex, PartitionSpec), got {rule!r}")
        pattern, spec = rule
        candidates = (spec,) if isinstance(spec, P) else spec
        if not (isinstance(candidates, tuple) and candidates
                and all(isinstance(c, P) for c in candidates)):
            raise ValueError(f"partition rule #{i} ({pattern!r}): spec must be a PartitionSpec or "
                             f"a tuple of them, got {spec!r}")
        try:
            compiled.append((pattern, re.compile(pattern), candidates))
        except re.error as e:
            raise ValueError(f"partition rule #{i}: bad regex {pattern!r}: {e}") from None
    return compiled


def _spec_from_json(dims, where: str) -> P:
    if not isinstance(dims, list):
        raise ValueError(f"{where}: a spec is a list with one entry per array dimension "
                         f"(null, an axis name, or a list of axis names), got {dims!r}")
    out = []
    for d in dims:
        if d is None or isinstance(d, str):
            out.append(d)
        elif isinstance(d, list) and d and all(isinstance(a, str) for a in d):
            out.append(tuple(d))
        else:
            raise ValueError(f"{where}: bad dimension entry {d!r} (null, an axis name, or a list "
                             f"of axis names)")
        for axis in (d if isinstance(d, list) else [d]):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"{where}: unknown mesh axis {axis!r}; the axes are {MESH_AXES}")
    return P(*out)


def rules_from_json(data) -> tuple[tuple[str, P | tuple[P, ...]], ...]:
    """Partition rules from their JSON form (as written by `rules_to_json`)::

        [{"match": "blocks/\\d+/ffn/fc/kernel", "specs": [["fsdp", null], [null, "fsdp"]]},
         {"match": ".*/(bias|scale)", "spec": []}]

    `spec` is one PartitionSpec, one entry per dimension; `specs` lists
    alternatives tried in order (the first whose split dimensions divide).
    """
    if not isinstance(data, list):
        raise ValueError(f"partition rules must be a JSON list of rules, got {type(data).__name__}")
    rules = []
    for i, rule in enumerate(data):
        where = f"partition rule #{i}"
        if not isinstance(rule, dict) or not isinstance(rule.get("match"), str) \
                or ("spec" in rule) == ("specs" in rule) or set(rule) - {"match", "spec", "specs"}:
            raise ValueError(f"{where} must be {{\"match\": REGEX, \"spec\": [...]}} or "
                             f"{{\"match\": REGEX, \"specs\": [[...], ...]}}, got {rule!r}")
        where = f"{where} ({rule['match']!r})"
        if "spec" in rule:
            spec = _spec_from_json(rule["spec"], where)
        else:
            if not isinstance(rule["specs"], list) or not rule["specs"]:
                raise ValueError(f"{where}: specs must be a non-empty list of specs")
            spec = tuple(_spec_from_json(s, where) for s in rule["specs"])
        rules.append((rule["match"], spec))
    _compile_rules(rules)  # regexes checked here, with the rule named
    return tuple(rules)


def rules_as_data(rules: Rules = DEFAULT_RULES) -> list[dict]:
    """`rules` as plain lists and dicts, the inverse of `rules_from_json`."""
    def dims(spec: P):
        return [list(d) if isinstance(d, tuple) else d for d in spec]

    return [{"match": pattern, "spec": dims(spec)} if isinstance(spec, P)
            else {"match": pattern, "specs": [dims(s) for s in spec]}
            for pattern, spec in rules]


def rules_to_json(rules: Rules = DEFAULT_RULES) -> str:
    """The JSON text of `rules`, one rule per line (the default ones: a file to
    start a layout from)."""
    return "[\n  " + ",\n  ".join(json.dumps(r) for r in rules_as_data(rules)) + "\n]\n"


def load_rules(path: str | os.PathLike) -> tuple[tuple[str, P | tuple[P, ...]], ...]:
    """Partition rules from a JSON file (see `rules_from_json`)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"partition rules file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"partition rules file {str(path)!r} is not valid JSON: {e}") from None
    try:
        return rules_from_json(data)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def _spec_problem(shape: tuple[int, ...], spec: P, mesh: Mesh) -> str | None:
    """Why `spec` cannot split an array of `shape` on `mesh` (None when it can)."""
    if len(spec) > len(shape):
        return f"spec {spec} has more entries than the {len(shape)} dimensions"
    for dim, entry in enumerate(spec):
        if entry is None:
            continue
        axes = entry if isinstance(entry, tuple) else (entry,)
        for a in axes:
            if a not in mesh.shape:
                return f"spec {spec} names mesh axis {a!r}; the mesh has {tuple(mesh.shape)}"
        n = math.prod(mesh.shape[a] for a in axes)
        if shape[dim] % n:
            return (f"dimension {dim} (size {shape[dim]}) is not divisible by mesh axis "
                    f"{entry!r} of size {n} (spec {spec})")
    return None


def param_specs(params, mesh: Mesh, rules: Rules = DEFAULT_RULES, *, strict: bool = False):
    """A pytree of PartitionSpec, one per parameter, from the first matching rule.

    The rule's regex must match the whole path (``re.fullmatch``); when its
    spec is a tuple, the first candidate that fits the shape and mesh wins.
    `params` may hold arrays or `jax.ShapeDtypeStruct`s. A parameter no rule
    matches is replicated (``P()``), and one warning lists every such path.
    Raises ValueError for a spec that fits neither the shape nor the mesh (a
    dimension not divisible by its mesh axis, an unknown axis), and, when
    `strict`, for a parameter no rule matches or a rule that matches no
    parameter.
    """
    compiled = _compile_rules(rules)
    used = [False] * len(compiled)
    unmatched: list[str] = []

    def spec_for(path, leaf):
        name = path_str(path)
        shape = tuple(leaf.shape)
        for i, (pattern, regex, candidates) in enumerate(compiled):
            if regex.fullmatch(name):
                used[i] = True
                problems = []
                for spec in candidates:
                    problem = _spec_problem(shape, spec, mesh)
                    if problem is None:
                        return spec
                    problems.append(problem)
                raise ValueError(f"parameter {name} of shape {shape}, rule {pattern!r}: "
                                 + "; ".join(problems) + ". Change the rule or the mesh "
                                 "(GPTConfig.vocab_multiple pads the vocabulary)")
        if strict:
            raise ValueError(f"parameter {name} (shape {shape}) matches no partition rule "
                             f"(strict mode); rules: {[r[0] for r in compiled]}")
        unmatched.append(f"{name} {shape}")
        return P()

    specs = jax.tree_util.tree_map_with_path(spec_for, params)
    if unmatched:
        warnings.warn(f"{len(unmatched)} parameter(s) match no partition rule and are "
                      f"replicated: {', '.join(unmatched)}. Add a rule to shard them "
                      f"(strict=True makes this an error)", stacklevel=2)
    # a default rule of another family than the tree's (Llama's q/k/v/o on a GPT-2
    # tree) is not unused: the families are the ones whose rules of their own matched
    families = [_RULE_FAMILIES.get(c[0], frozenset()) for c in compiled]
    present = {f for fams, u in zip(families, used) if u and len(fams) == 1 for f in fams}
    unused = [c[0] for c, u, fams in zip(compiled, used, families)
              if not u and not (fams and present and not fams & present)]
    if strict and unused:
        raise ValueError(f"partition rule(s) {unused} match no parameter (strict mode)")
    return specs


def param_shardings(params, mesh: Mesh, rules: Rules = DEFAULT_RULES, *, strict: bool = False):
    """A pytree of NamedSharding for `params` (see `param_specs`)."""
    specs = param_specs(params, mesh, rules, strict=strict)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                        is_leaf=lambda x: isinstance(x, P))


def _keys(path) -> tuple[str, ...]:
    return tuple(path_str((k,)) for k in path)


def opt_state_shardings(opt_state, params_shardings, mesh: Mesh, *, params=None):
    """Shardings for an optax state, leaf by leaf.

    A leaf whose key path ends with a parameter's path (``.../mu/blocks/0/
    attn/qkv/kernel``) takes that parameter's sharding: moments and traces
    over the whole tree, over the trainable subtree only (None where a leaf is
    frozen), or inside `optax.masked` / `multi_transform` states. When
    `params` (arrays or shapes) is given the leaf must also have the
    parameter's shape, else the sharding must fit the leaf's shape; every
    other leaf (step counts, schedule state, factored statistics) is
    replicated.
    """
    replicated = NamedSharding(mesh, P())
    flat_sh = jax.tree_util.tree_flatten_with_path(
        params_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]
    by_path = {_keys(path): sh for path, sh in flat_sh}
    shapes = None if params is None else {
        _keys(path): tuple(leaf.shape)
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}

    def for_leaf(path, leaf):
        keys = _keys(path)
        shape = tuple(getattr(leaf, "shape", ()))
        for start in range(len(keys)):  # the longest matching parameter path wins
            sh = by_path.get(keys[start:])
            if sh is None:
                continue
            fits = (shapes[keys[start:]] == shape if shapes is not None else
                    isinstance(sh, NamedSharding) and _spec_problem(shape, sh.spec, mesh) is None)
            if fits:
                return sh
        return replicated

    return jax.tree_util.tree_map_with_path(for_leaf, opt_state)


def train_state_shardings(state: TrainState, mesh: Mesh, rules: Rules = DEFAULT_RULES, *,
                          strict: bool = False) -> TrainState:
    """A TrainState of NamedSharding: params and optimizer moments per the
    rules, the step counter and dropout key replicated. `state` holds arrays
    or `jax.ShapeDtypeStruct`s of any tree and any optax state."""
    ps = param_shardings(state.params, mesh, rules, strict=strict)
    replicated = NamedSharding(mesh, P())
    return TrainState(step=replicated, params=ps,
                      opt_state=opt_state_shardings(state.opt_state, ps, mesh,
                                                    params=state.params),
                      rng=replicated)


def shard_train_state(state: TrainState, mesh: Mesh, rules: Rules = DEFAULT_RULES, *,
                      strict: bool = False) -> TrainState:
    """Place an existing (single-host) state on the mesh."""
    return jax.device_put(state, train_state_shardings(state, mesh, rules, strict=strict))


def abstract_train_state(config: GPTConfig, tc: TrainConfig, optimizer=None, *,
                         trainable: Trainable = None,
                         state: TrainState | None = None) -> TrainState:
    """The TrainState's shapes and dtypes (`jax.ShapeDtypeStruct`), nothing allocated:
    those of `state` when given (any tree, any optimizer), else of a fresh
    `init_params(config)` state with `optimizer` over the `trainable` leaves."""
    if state is not None:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    return jax.eval_shape(_default_init(config, tc, optimizer, trainable), jax.random.key(tc.seed))


def _default_init(config: GPTConfig, tc: TrainConfig, optimizer, trainable: Trainable):
    optimizer = optimizer or make_optimizer(tc)
    return lambda key: init_train_state(init_params(config, key, scheme=tc.init), tc, optimizer,
                                        trainable=trainable)


def init_sharded_train_state(config: GPTConfig, tc: TrainConfig, mesh: Mesh,
                             rules: Rules = DEFAULT_RULES, key: jax.Array | None = None,
                             optimizer=None, *, strict: bool = False,
                             trainable: Trainable = None,
                             init_fn: Callable[[jax.Array], TrainState] | None = None
                             ) -> TrainState:
    """A fresh TrainState created directly in its shards: no device ever holds
    the full parameters (what makes FSDP fit models larger than one device).

    `init_fn(key) -> TrainState` builds the state (your own head, adapters,
    optimizer; it is traced, not run eagerly); by default the values of
    `init_train_state(init_params(config, key), tc, optimizer, trainable=trainable)`.
    """
    key = jax.random.key(tc.seed) if key is None else key
    init_fn = init_fn or _default_init(config, tc, optimizer, trainable)
    shardings = train_state_shardings(jax.eval_shape(init_fn, key), mesh, rules, strict=strict)
    return jax.jit(init_fn, out_shardings=shardings)(key)


# -- batches -------------------------------------------------------------------
def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Token batches (batch, seq): rows split over every device, sequence whole."""
    return NamedSharding(mesh, BATCH_SPEC)


def batch_divisor(mesh: Mesh) -> int:
    """The global batch must divide by this: the product of the batch axes."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(global_batch: int, mesh: Mesh, name: str = "batch") -> None:
    n = batch_divisor(mesh)
    if global_batch % n:
        raise ValueError(
            f"{name} of {global_batch} sequences is not divisible by the mesh's batch axes "
            f"{' * '.join(f'{a}={mesh.shape[a]}' for a in BATCH_AXES)} = {n}")


def shard_batch(mesh: Mesh, *arrays, per_process: bool = False):
    """Global batch arrays split by `batch_sharding`.

    Host arrays (numpy, lists) are by default the whole global batch, the same
    on every process (as when every host computes batch k of a seeded
    order); each process copies only the rows its devices hold
    (`jax.make_array_from_callback`). With `per_process=True` each process
    passes only its own rows (process i loaded rows i*b..(i+1)*b-1, say) and
    the global batch is their concatenation in process order
    (`jax.make_array_from_process_local_data`): no host sees it all. With one
    process both modes are the same. A `jax.Array` is already global and is
    resharded if needed. A batch not divisible by the batch axes is a ValueError.
    """
    sharding = batch_sharding(mesh)
    out = []
    for a in arrays:
        if isinstance(a, jax.Array):
            check_batch(a.shape[0] if a.ndim else 0, mesh)
            out.append(a if a.sharding == sharding else jax.device_put(a, sharding))
            continue
        a = np.asarray(a)
        if a.ndim < 1:
            raise ValueError(f"batch arrays need a leading batch dimension, got shape {a.shape}")
        if per_process:
            check_batch(a.shape[0] * jax.process_count(), mesh)
            out.append(jax.make_array_from_process_local_data(sharding, a))
        else:
            check_batch(a.shape[0], mesh)
            out.append(jax.make_array_from_callback(a.shape, sharding, lambda index, a=a: a[index]))
    return out[0] if len(out) == 1 else tuple(out)


def process_rows(mesh: Mesh, global_batch: int) -> slice:
    """The rows of a global batch that this process's devices hold under
    `batch_sharding`: what it loads and passes to `shard_batch(..., per_process=True)`."""
    check_batch(global_batch, mesh)
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    rows = sorted({i for idx in index_map.values() for i in range(*idx[0].indices(global_batch))})
    if rows != list(range(rows[0], rows[-1] + 1)):
        raise ValueError(f"this process's devices hold rows {rows} of the batch, not one block; "
                         "build the mesh with each process's devices together (make_mesh does)")
    return slice(rows[0], rows[-1] + 1)


# -- sharded steps -------------------------------------------------------------
def _check_native_kernels(config: GPTConfig, mesh: Mesh) -> None:
    # XLA's partitioner cannot split a custom call: it would gather every
    # sharded operand onto each device, undoing FSDP.
    for name, native, alternative in NATIVE_KERNEL_FIELDS:
        if getattr(config, name) == native and mesh.size > 1:
            raise ValueError(f"{name}={native!r} runs on one CPU device; a mesh of {mesh.size} "
                             f"devices needs {name}={alternative!r}")


def make_sharded_train_step(config: GPTConfig, tc: TrainConfig, mesh: Mesh,
                            rules: Rules = DEFAULT_RULES, optimizer=None, *,
                            task: Task = lm_task, trainable: Trainable = None,
                            strict: bool = False, state: TrainState | None = None) -> Callable:
    """`step(state, batch) -> (state, metrics)` jitted over the mesh.

    The state comes in and goes out with `train_state_shardings` (donated, so
    updated in place shard by shard), every array of the batch dict split
    along its leading axis by `batch_sharding`, the metrics replicated. The
    shardings are derived from `state` (arrays or `jax.ShapeDtypeStruct`s:
    a tree with a new head or adapters, say), by default from a fresh
    `init_params` state. Host arrays are the global batch, placed with
    `shard_batch` (per-host rows: call `shard_batch(..., per_process=True)`
    first); a batch that does not divide over the batch axes is a ValueError.
    """
    _check_native_kernels(config, mesh)
    optimizer = optimizer or make_optimizer(tc)
    if state is None:
        state = jax.eval_shape(lambda: init_train_state(
            init_params(config, jax.random.key(tc.seed)), tc, optimizer, trainable=trainable))
    state_sh = train_state_shardings(state, mesh, rules, strict=strict)
    bs, replicated = batch_sharding(mesh), NamedSharding(mesh, P())
    jitted = jax.jit(make_train_step(config, tc, optimizer, task=task, trainable=trainable,
                                     jit=False),
                     in_shardings=(state_sh, bs), out_shardings=(state_sh, replicated),
                     donate_argnums=0)

    def sharded_train_step(state: TrainState, batch):
        try:
            return jitted(state, _shard_batch_dict(mesh, batch))
        except ValueError:  # told apart only on failure: nothing added to a step that runs
            if jax.tree.structure(state) == jax.tree.structure(state_sh):
                raise
        raise ValueError("the state is not the tree this step's shardings were made for "
                         "(another parameter tree or optimizer state: an extra head or "
                         "adapters?); pass it when building the step: "
                         "make_sharded_train_step(..., state=state)")

    sharded_train_step.jitted = jitted
    sharded_train_step.state_shardings = state_sh
    return sharded_train_step


def _shard_batch_dict(mesh: Mesh, batch) -> dict:
    keys = list(batch)
    arrays = shard_batch(mesh, *(batch[k] for k in keys))
    return dict(zip(keys, arrays if len(keys) > 1 else (arrays,)))


def make_sharded_eval_step(config: GPTConfig, mesh: Mesh, params_shardings, *,
                           task: Task = lm_task) -> Callable:
    """`eval_step(params, batch) -> {"loss_sum", "count", ...}` jitted over the mesh;
    `params_shardings` as from `param_shardings` (or `state_shardings.params`).

    Batches are split like training batches; one that does not divide over
    the batch axes (the last, partial batch of an evaluation set) is
    replicated instead, so every evaluation batch works.
    """
    _check_native_kernels(config, mesh)
    replicated = NamedSharding(mesh, P())
    # Batch shardings left to the arguments: split or replicated, as placed below.
    jitted = jax.jit(make_eval_step(config, task=task, jit=False),
                     in_shardings=(params_shardings, None), out_shardings=replicated)

    def sharded_eval_step(params, batch):
        rows = np.shape(next(iter(batch.values())))[0]
        if rows % batch_divisor(mesh) == 0:
            batch = _shard_batch_dict(mesh, batch)
        else:
            batch = {k: jax.make_array_from_callback(
                np.shape(a), replicated, lambda index, a=np.asarray(a): a[index])
                for k, a in batch.items()}
        return jitted(params, batch)

    sharded_eval_step.jitted = jitted
    return sharded_eval_step


# -- several hosts -------------------------------------------------------------
ENV_COORDINATOR = "JAXLLM_COORDINATOR"
ENV_NUM_PROCESSES = "JAXLLM_NUM_PROCESSES"
ENV_PROCESS_ID = "JAXLLM_PROCESS_ID"


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None, **kwargs: Any) -> None:
    """Join a multi-host run: a thin wrapper over `jax.distributed.initialize`.

    Call it once per process, before anything else touches JAX devices. Each
    argument falls back to an environment variable (`JAXLLM_COORDINATOR`,
    `JAXLLM_NUM_PROCESSES`, `JAXLLM_PROCESS_ID`); when none is set at all, JAX
    detects the cluster itself (SLURM, Open MPI, Cloud TPU). On two hosts::

        # host 0 (its address is the coordinator's), then host 1
        JAXLLM_COORDINATOR=10.0.0.1:1234 JAXLLM_NUM_PROCESSES=2 JAXLLM_PROCESS_ID=0 python train.py
        JAXLLM_COORDINATOR=10.0.0.1:1234 JAXLLM_NUM_PROCESSES=2 JAXLLM_PROCESS_ID=1 python train.py

    where train.py calls `initialize_distributed()` first (`jaxllm pretrain
    --distributed --mesh ...` does).

    Afterwards `jax.devices()` lists every host's devices, so `make_mesh`
    spans them all. Extra keyword arguments go to `jax.distributed.initialize`.
    """
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = _int_arg("num_processes", num_processes, ENV_NUM_PROCESSES)
    process_id = _int_arg("process_id", process_id, ENV_PROCESS_ID)
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
             "process_id": process_id}
    missing = [k for k, v in given.items() if v is None]
    if missing and len(missing) < len(given):
        raise ValueError(f"initialize_distributed: got {given}; also give {missing} (arguments or "
                         f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID})")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"initialize_distributed: process_id {process_id} is outside "
                         f"[0, num_processes={num_processes})")
    # CPU processes need a collectives library to talk to each other; GPUs and TPUs
    # bring their own, and this setting does not touch them.
    if os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION") is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)


def _int_arg(name: str, value: int | None, env: str) -> int | None:
    if value is not None:
        return int(value)
    raw = os.environ.get(env)
    if raw in (None, ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{env} must be an int for {name}, got {raw!r}") from None


# -- sharded checkpoints ---------------------------------------------------------
def abstract_sharded_state(config: GPTConfig, tc: TrainConfig, mesh: Mesh,
                           rules: Rules = DEFAULT_RULES, optimizer=None, *,
                           strict: bool = False, trainable: Trainable = None,
                           state: TrainState | None = None) -> TrainState:
    """The TrainState as `jax.ShapeDtypeStruct`s carrying their shardings on
    `mesh`: the target that restores a checkpoint straight into its shards,
    `jaxllm.train.checkpoint.restore(run_dir, target=...)`, whatever mesh
    shape it was saved from (Orbax writes and reads each shard).

    The shapes are those of `state` (arrays or `jax.ShapeDtypeStruct`s:
    `jax.eval_shape` of your own init, or
    `jaxllm.train.checkpoint.saved_state_shapes(run_dir)`), else of
    `abstract_train_state(config, tc, optimizer, trainable=trainable)`."""
    abstract = abstract_train_state(config, tc, optimizer, trainable=trainable, state=state)
    shardings = train_state_shardings(abstract, mesh, rules, strict=strict)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
