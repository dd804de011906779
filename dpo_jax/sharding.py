"""Device mesh, logical-axis rules, and the shardings of state and batches.

Parameters carry logical axis names (``vocab``, ``embed``, ``mlp``, ``heads``, ...). A rules table
maps each name to a mesh axis of ``('data', 'fsdp', 'tensor')``, so pure data parallelism, FSDP
and FSDP + tensor parallelism are config changes, not code changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# Rows of a batch are split over every axis that holds a replica of the model's batch dim.
BATCH_AXES = ("data", "fsdp")

# Default logical -> mesh rules: FSDP shards the model dimension, tensor parallelism the
# vocabulary, MLP and heads (Megatron layout). An axis missing from the mesh shape is size 1.
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
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
)


def make_mesh(shape: Mapping[str, int] | Sequence[int], devices=None) -> Mesh:
    """Mesh with axes ('data', 'fsdp', 'tensor'); one entry may be -1 (all remaining devices).

    Over several hosts the device order comes from ``jax.make_mesh``, which keeps the
    ``tensor`` and ``fsdp`` axes inside a host where the device count allows.
    """
    if isinstance(shape, Mapping):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"mesh axes {sorted(unknown)} unknown; valid axes are {MESH_AXES}")
        dims = [int(shape.get(a, 1)) for a in MESH_AXES]
    else:
        dims = [int(d) for d in shape]
        if len(dims) != 3:
            raise ValueError(f"mesh shape {tuple(dims)} must have 3 entries {MESH_AXES}")
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
    """PartitionSpec for one array: each logical axis -> its mesh axis, when that divides it.

    A dimension whose size the mesh axis does not divide stays replicated (e.g. 50257 vocab over
    tensor=2), and no mesh axis is used twice in one array.
    """
    if axes is None:
        return P()
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(axes, shape):
        mesh_axis = table.get(name) if name is not None else None
        if (
            mesh_axis is None
            or mesh_axis in used
            or mesh.shape[mesh_axis] == 1
            or size % mesh.shape[mesh_axis]
        ):
            spec.append(None)
        else:
            spec.append(mesh_axis)
            used.add(mesh_axis)
    return P(*spec)


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


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Rows over ('data', 'fsdp'); the remaining dims replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    return {k: batch_sharding(mesh, np.ndim(v)) for k, v in batch.items()}


def num_batch_shards(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
