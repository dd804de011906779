"""Device mesh, logical-axis rules, and the shardings of state and batches.

Parameters carry logical axis names (``vocab``, ``embed``, ``mlp``, ``heads``, ...). A rules table
maps each name to a mesh axis of ``('data', 'fsdp', 'context', 'tensor')`` (or to several, which
then split that dimension together), so pure data parallelism, FSDP, FSDP + tensor parallelism
and context parallelism are config changes, not code changes.

``context`` splits the sequence: the token arrays of a batch and the activations between layers
are sharded along their length, and attention and the log-probs exchange what they need across
it (``models/context_parallel.py``). The name follows Megatron / NeMo's "context parallelism"
(every activation split along the sequence, attention exact across the split); Megatron's
"sequence parallelism" means something narrower (the norms' activations split inside a
tensor-parallel group), and MaxText calls the same axis ``context``. A mesh without it (size 1)
is the three-axis mesh of earlier runs: configs and checkpoints are unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Axis order = device order of jax.make_mesh (the last axis varies fastest, i.e. stays inside a
# host longest): tensor parallelism innermost, then the sequence, then FSDP and data, as Llama
# 3's [TP, CP, PP, DP] (Dubey et al. 2024, sec. 3.3.2).
MESH_AXES = ("data", "fsdp", "context", "tensor")
# The three-axis mesh of earlier configs: a 3-entry shape sequence is read in this order.
LEGACY_MESH_AXES = ("data", "fsdp", "tensor")
# Rows of a batch are split over every axis that holds a replica of the model's batch dim.
BATCH_AXES = ("data", "fsdp")
# The sequence axis (context parallelism): token arrays are split along their length over it.
CONTEXT_AXIS = "context"
# Arrays of a batch laid out [rows, length] (batch_format / ARCHITECTURE.md): split along the
# sequence over CONTEXT_AXIS; every other array (per example, per sequence) only by rows.
TOKEN_KEYS = ("input_ids", "positions", "segment_ids", "loss_mask", "seq_index", "branch_ids",
              "tree_lo", "tree_hi")
# Padding values of TOKEN_KEYS when a batch's length is rounded up to a multiple of the context
# axis (pad_for_context): segment 0, never scored, so no real token sees it or is changed by it.
_TOKEN_PAD = {"input_ids": 0, "positions": 0, "segment_ids": 0, "loss_mask": 0,
              "seq_index": 0, "branch_ids": 0, "tree_lo": 0, "tree_hi": 0}

# Default logical -> mesh rules: FSDP shards the model dimension, tensor parallelism the
# vocabulary, MLP and heads (Megatron layout). An axis missing from the mesh shape is size 1.
# `embed` is split over fsdp and context together: the devices of a context group hold
# different tokens of the same rows, so they are data-parallel for the weights and share the
# parameter / gradient / optimizer shards as FSDP's do (Megatron folds its CP group into the
# distributed optimizer's DP group the same way); with context = 1 this is plain `fsdp`.
# Mixture-of-experts weights [layers, expert, embed, mlp] put whole experts on the `fsdp` axis
# (the expert axis precedes `embed` in those arrays and an array uses a mesh axis once): each
# fsdp shard holds n_experts / fsdp experts, split over `tensor` along their hidden width. Where fsdp
# does not divide n_experts the expert axis stays whole and `embed` takes `fsdp` as in a dense
# MLP. Weights are gathered for the compute as FSDP gathers them, unless the model's
# `moe_expert_axis` names the axis (expert parallelism, models/moe_parallel.py: each device
# runs its own experts on the tokens sent to it).
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("vocab", "tensor"),
    ("expert", "fsdp"),
    ("embed", ("fsdp", "context")),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
)


def read_mesh_shape(shape: Mapping[str, Any], attention_impl: str | None = "") -> dict:
    """A run config's ``mesh.shape`` as ``{axis: size}`` over :data:`MESH_AXES` (a missing axis
    is 1, so the three-axis configs of earlier runs read as context 1). ValueError naming the
    field for an unknown axis, a size that is neither >= 1 nor -1, or a context axis > 1 with
    a setting that cannot split the sequence (``model.attention_impl='cudnn'``)."""
    shape = dict(shape)
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh.shape: unknown axes {unknown}; the axes are {MESH_AXES}")
    out = {}
    for axis in MESH_AXES:
        value = shape.get(axis, 1)
        size = -2 if value is None else int(value)
        if size < 1 and size != -1:
            raise ValueError(f"mesh.shape.{axis}={value!r}: must be >= 1, or -1 (the rest)")
        out[axis] = size
    if out[CONTEXT_AXIS] != 1 and (attention_impl or "") == "cudnn":
        raise ValueError(f"mesh.shape.context={out['context']} splits the sequence, and its "
                         f"attention (models/context_parallel.py) runs XLA or query-blocked "
                         f"attention on each shard: set model.attention_impl to '' or "
                         f"'chunked' (not 'cudnn')")
    return out


def read_mesh_rules(rules) -> tuple:
    """A run config's ``mesh.rules`` as a hashable tuple of ``(logical name, mesh axis | tuple
    of mesh axes | None)``; ValueError naming the rule for a malformed entry or an unknown mesh
    axis."""
    out = []
    for i, rule in enumerate(rules):
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"mesh.rules[{i}]={list(rule)!r}: expected [logical name, mesh "
                             f"axis or list of mesh axes or None]")
        name, axis = rule
        axes = () if axis is None else (axis,) if isinstance(axis, str) else tuple(axis)
        bad = [a for a in axes if a not in MESH_AXES]
        if bad:
            raise ValueError(f"mesh.rules[{i}] ({name!r}): unknown mesh axes {bad}; the axes "
                             f"are {MESH_AXES}")
        out.append((name, axis if axis is None or isinstance(axis, str) else axes))
    return tuple(out)


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices=None) -> Mesh:
    """Mesh with axes ('data', 'fsdp', 'context', 'tensor'); one entry may be -1 (all remaining
    devices). ``shape``: a mapping (missing axes are 1) or a sequence of 4 entries in that order,
    or of 3 in the earlier order ('data', 'fsdp', 'tensor') (context 1). ValueError for an
    unknown axis, a wrong length, a non-positive size or a product that is not the device count.

    Over several hosts the device order comes from ``jax.make_mesh``, which keeps the
    ``tensor``, ``context`` and ``fsdp`` axes inside a host where the device count allows.
    """
    if isinstance(shape, Mapping):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh axes {sorted(unknown)} unknown; valid axes are {MESH_AXES}")
        dims = [int(shape.get(a, 1)) for a in MESH_AXES]
    else:
        dims = [int(d) for d in shape]
        if len(dims) == 3:
            dims = [dict(zip(LEGACY_MESH_AXES, dims)).get(a, 1) for a in MESH_AXES]
        elif len(dims) != 4:
            raise ValueError(f"mesh shape {tuple(dims)} must have 4 entries {MESH_AXES} "
                             f"(or 3: {LEGACY_MESH_AXES})")
    bad = [f"{a}={d}" for a, d in zip(MESH_AXES, dims) if d < 1 and d != -1]
    if bad:
        raise ValueError(f"mesh shape: {', '.join(bad)}; each axis is >= 1 or -1 (the rest)")
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if dims.count(-1) > 1:
        raise ValueError(f"mesh shape {dims}: at most one axis may be -1")
    if -1 in dims:
        known = int(np.prod([d for d in dims if d != -1]))
        if n % known:
            raise ValueError(f"mesh shape {dims} does not divide the {n} devices")
        dims[dims.index(-1)] = n // known
    if int(np.prod(dims)) != n:
        raise ValueError(
            f"mesh shape {dict(zip(MESH_AXES, dims))} needs {int(np.prod(dims))} devices, "
            f"but {n} are available"
        )
    # Auto axes: GSPMD propagates shardings from the annotated inputs and outputs (explicit
    # sharding types would demand an out_sharding on every gather).
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(tuple(dims), MESH_AXES, axis_types=auto, devices=devices)


def logical_to_spec(
    axes: Sequence[str | None] | None,
    shape: Sequence[int],
    mesh: Mesh,
    rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES,
) -> P:
    """PartitionSpec for one array: each logical axis -> its mesh axis (or axes), when that
    divides it.

    A rule may name one mesh axis or a tuple of them (the dimension is split over their
    product, in that order). Mesh axes of size 1, absent from the mesh, or already used by an
    earlier dimension of the array are dropped; if the product of the rest does not divide the
    dimension, the last ones are dropped until it does (e.g. 50257 vocab over tensor=2 stays
    replicated). No mesh axis is used twice in one array.
    """
    if axes is None:
        return P()
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        target = table.get(name) if name is not None else None
        names = (target,) if isinstance(target, str) else tuple(target or ())
        names = [a for a in names
                 if a not in used and a in mesh.shape and mesh.shape[a] > 1]
        while names and size % int(np.prod([mesh.shape[a] for a in names])):
            names.pop()
        if not names:
            spec.append(None)
            continue
        spec.append(names[0] if len(names) == 1 else tuple(names))
        used.update(names)
    return P(*spec)


def spec_devices(spec: P, mesh_shape: Mapping[str, int]) -> int:
    """How many ways ``spec`` splits its array: the product of the sizes of the mesh axes it
    names (an entry may be an axis or a tuple of axes)."""
    split = 1
    for entry in spec:
        for a in (entry,) if isinstance(entry, str) else (entry or ()):
            split *= int(mesh_shape[a])
    return split


def _is_axes(x: Any) -> bool:
    return x is None or (isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x))


def tree_shardings(abstract_tree, axes_tree, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a tree of ShapeDtypeStructs given a same-structure tree of axes."""
    return jax.tree.map(
        lambda axes, a: NamedSharding(mesh, logical_to_spec(axes, a.shape, mesh, rules)),
        axes_tree,
        abstract_tree,
        is_leaf=_is_axes,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def context_size(mesh) -> int:
    """Devices along the sequence axis (1 on a mesh without it)."""
    return int(dict(mesh.shape).get(CONTEXT_AXIS, 1))


def batch_sharding(mesh: Mesh, ndim: int = 2, sequence: bool = False) -> NamedSharding:
    """Rows over ('data', 'fsdp'); with ``sequence`` (a [rows, length, ...] token array) the
    length over 'context' when that axis has more than one device; the rest replicated."""
    rest = [None] * (ndim - 1)
    if sequence and ndim >= 2 and context_size(mesh) > 1:
        rest[0] = CONTEXT_AXIS
    return NamedSharding(mesh, P(BATCH_AXES, *rest))


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    """Shardings of a batch's arrays: :data:`TOKEN_KEYS` split along rows and length, the
    others along rows. ValueError when the context axis does not divide a token array's length
    (:func:`pad_for_context` rounds it up)."""
    c = context_size(mesh)
    out = {}
    for k, v in batch.items():
        sequence = k in TOKEN_KEYS and np.ndim(v) >= 2
        if sequence and c > 1 and np.shape(v)[1] % c:
            raise ValueError(f"batch array {k!r} has length {np.shape(v)[1]}, which the "
                             f"{c} devices of mesh axis {CONTEXT_AXIS!r} do not divide; "
                             f"pad it (sharding.pad_for_context)")
        out[k] = batch_sharding(mesh, np.ndim(v), sequence)
    return out


def pad_for_context(batch: Mapping[str, Any], mesh) -> dict[str, Any]:
    """A host batch whose token arrays (:data:`TOKEN_KEYS`) are right-padded to a multiple of
    the mesh's context size: padding is segment 0 and unscored, as a batch's own padding, so
    every log-prob and loss is unchanged. The batch itself when nothing needs padding."""
    c = context_size(mesh)
    length = next((np.shape(batch[k])[1] for k in TOKEN_KEYS if k in batch), None)
    if c == 1 or length is None or length % c == 0:
        return dict(batch)
    pad = -length % c
    out = dict(batch)
    for k in TOKEN_KEYS:
        if k in batch:
            v = np.asarray(batch[k])
            widths = [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2)
            out[k] = np.pad(v, widths, constant_values=_TOKEN_PAD[k])
    return out


def num_batch_shards(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
