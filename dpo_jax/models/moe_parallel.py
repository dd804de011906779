"""Expert parallelism for the sparse mixture-of-experts MLP (models/moe.py, `moe_expert_axis`).

The E experts are split over one mesh axis (e devices along it, E / e experts each, expert
j's weights on device j // (E / e)); the tokens are split over every axis of the mesh. Under
`jax.shard_map` each device routes its own tokens' T k copies, sorts them by expert (hence by
the device that holds the expert), and one `jax.lax.all_to_all` over the expert axis sends
each copy to its expert's device. There every received copy is put in the group of its local
expert, the local experts run their grouped matmuls (moe_dispatch.grouped_mlp), and a second
all_to_all sends the outputs back, where they are summed with the router weights as in the
single-device dispatch (moe_dispatch.sparse_experts; the same numbers to float32 round-off).
The dispatch / combine all_to_all pair of GShard (Lepikhin et al. 2021, sec. 3.2) without its
capacity factor, as MaxText's `sparse_matmul` expert-parallel path.

Dropless: the all_to_all buffers have a fixed size, so each device sends every destination a
chunk of n = (local tokens) k rows, the worst case (all its copies to one device), and
receives e such chunks: per device 2 e n D activations for each exchange, e times what a
ragged exchange needs (`jax.lax.ragged_all_to_all` does not run on the CPU backend of jax
0.10, where this project is tested). The grouped matmul runs on the received rows only (the
tiled kernel skips the empty tiles; `ragged_dot` gets the group sizes).

Devices along the other mesh axes hold the same experts and work on other tokens; the weight
gradients are summed over them by shard_map's transpose. Expert weights enter the shard_map
whole along their embed and hidden widths (XLA gathers an FSDP- or tensor-sharded layout).

Shape suffixes: T tokens, K top-k, N = T K copies, D d_model, F expert width, E experts,
e devices on the expert axis, El = E / e local experts, R = e N received rows.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dpo_jax.models import moe_dispatch


def expert_mesh(axis: str | None):
    """The mesh of the surrounding `jax.set_mesh` context when it has `axis` with more than one
    device, else None (the experts then run in one place: moe_dispatch.sparse_experts)."""
    if axis is None:
        return None
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis not in mesh.axis_names or mesh.shape[axis] == 1:
        return None
    return mesh


def expert_parallel(act: str, x_TD: jax.Array, index_TK: jax.Array, weight_TK: jax.Array,
                    gate_EDF: jax.Array, up_EDF: jax.Array, down_EFD: jax.Array, *, mesh,
                    axis: str, kernel: str | None = None, tile: int = 128) -> jax.Array:
    """moe_dispatch.sparse_experts with the experts split over mesh axis `axis` and the copies
    exchanged by all_to_all (module docstring); the same arguments and result ([T, D], the
    dtype of x), plus `mesh` (a Mesh or AbstractMesh with `axis`); quantised experts
    (``quant.Experts``) are split on their expert axis like float ones. T need not divide by the
    mesh: padding tokens are added and dropped. ValueError when the axis size does not divide
    the number of experts, or on an unknown kernel."""
    kernel = moe_dispatch.check_kernel(kernel)
    E, e = moe_dispatch.n_experts(gate_EDF), mesh.shape[axis]
    if E % e:
        raise ValueError(f"moe_expert_axis {axis!r} has {e} devices, which do not divide the "
                         f"{E} experts")
    token_axes = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1)
    shards = math.prod(mesh.shape[a] for a in token_axes)
    T = x_TD.shape[0]
    pad = -T % shards
    index_TK = jnp.asarray(index_TK, jnp.int32)
    if pad:  # padding tokens go to expert E: sorted last, sent nowhere, output 0
        x_TD = jnp.pad(x_TD, ((0, pad), (0, 0)))
        index_TK = jnp.pad(index_TK, ((0, pad), (0, 0)), constant_values=E)
        weight_TK = jnp.pad(weight_TK, ((0, pad), (0, 0)))
    rows, experts = P(token_axes, None), P(axis)  # experts: also each leaf of quant.Experts
    local = functools.partial(_local, act, axis, e, E, kernel, tile)
    # check_vma off: the tiled kernel's skipped tiles (zeros) carry no varying-axis type
    y_TD = jax.shard_map(local, mesh=mesh, in_specs=(rows, rows, rows) + (experts,) * 3,
                         out_specs=rows, check_vma=False)(
        x_TD, index_TK, weight_TK, gate_EDF, up_EDF, down_EFD)
    return y_TD[:T]


def _local(act, axis, e, E, kernel, tile, x_TD, index_TK, weight_TK, gate_EDF, up_EDF,
           down_EFD):
    """One device's part: its tokens [T, D], [T, K]; its experts [El, D, F], [El, F, D]."""
    T, K = index_TK.shape
    N, El, D = T * K, E // e, x_TD.shape[1]
    order_N, sizes_E = moe_dispatch.sort_by_expert(index_TK, E)
    # send: sorted copy p goes to device dev[p], row p - start[dev] of the chunk for it
    send_e = sizes_E.reshape(e, El).sum(axis=1)
    start_e = jnp.cumsum(send_e) - send_e
    copy_N = jnp.arange(N, dtype=jnp.int32)
    dev_N = jnp.searchsorted(start_e + send_e, copy_N, side="right")  # e: a padding copy
    dev_c = jnp.minimum(dev_N, e - 1)
    slot_N = jnp.where(dev_N < e, dev_c * N + copy_N - start_e[dev_c], e * N)  # e N: nowhere
    buf = jnp.zeros((e * N, D), x_TD.dtype).at[slot_N].set(x_TD[order_N // K], mode="drop",
                                                            unique_indices=True)
    recv_RD = jax.lax.all_to_all(buf, axis, 0, 0, tiled=True)  # chunk i: from device i
    # received: chunk i holds C[i, l] copies for local expert l, in expert order
    me = jax.lax.axis_index(axis)
    C_eL = jax.lax.dynamic_slice_in_dim(jax.lax.all_gather(sizes_E, axis), me * El, El, axis=1)
    size_L = C_eL.sum(axis=0)
    cend_eL = jnp.cumsum(C_eL, axis=1)
    local_eN = jax.vmap(lambda ends: jnp.searchsorted(ends, copy_N, side="right"))(cend_eL)
    l_eN = jnp.minimum(local_eN, El - 1)
    take = lambda a_eL: jnp.take_along_axis(a_eL, l_eN, axis=1)
    # row of each received copy among all rows grouped by local expert (by source within one)
    group_eN = ((jnp.cumsum(size_L) - size_L)[l_eN] + take(jnp.cumsum(C_eL, axis=0) - C_eL)
                + copy_N[None, :] - take(cend_eL - C_eL))
    dest_R = jnp.where(local_eN < El, group_eN, e * N).reshape(-1)
    rows_RD = jnp.zeros_like(recv_RD).at[dest_R].set(recv_RD, mode="drop", unique_indices=True)
    ys_RD = moe_dispatch.grouped_mlp(act, rows_RD, size_L, gate_EDF, up_EDF, down_EFD, kernel,
                                     tile)
    back_RD = jax.lax.all_to_all(ys_RD.at[dest_R].get(mode="fill", fill_value=0), axis, 0, 0,
                                 tiled=True)  # chunk j: my copies, computed on device j
    ys_ND = back_RD.at[slot_N].get(mode="fill", fill_value=0)
    return moe_dispatch.combine(ys_ND, order_N, weight_TK)
