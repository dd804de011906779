"""Dropless sparse dispatch for the mixture-of-experts MLP (models/moe.py, `moe_impl='sparse'`).

Each of the T tokens is sent to its k experts as k copies; the T k copies are ordered by expert
and every expert runs its gated MLP on its own contiguous group of copies only (a grouped
matmul: no capacity factor, no token dropped, so the result equals the dense reference, where
every token runs through every expert and the unselected outputs are multiplied by 0). The
outputs go back to their tokens and are summed with the router weights. The expert FLOPs are
those of the k selected experts (plus the padding of the tiled kernel), not of all E.

Two grouped-matmul kernels compute the same numbers (`moe_kernel`):

* ``ragged_dot``: `jax.lax.ragged_dot` over the copies sorted by expert with the group sizes
  (as MaxText's `sparse_matmul` / megablox gmm). XLA lowers it to a grouped kernel on TPU and
  GPU; on CPU jax 0.10 lowers it to a masked dense dot over all E experts (no saving there).
* ``tiled``: the sorted copies laid out in tiles of `m` rows, each expert's group padded to a
  whole number of tiles (at most T k + E (m - 1) rows, a static bound); one `lax.scan` over the
  tiles multiplies each by its own expert's weights (a `jax.custom_vjp`: the backward pass runs
  the same scan for the input gradient and accumulates each tile's weight gradient in place,
  in float32).
  Unused tail tiles are skipped. The CPU kernel; also correct on any backend.

`None` (the default) picks ``ragged_dot`` on TPU / GPU and ``tiled`` on CPU.

Shape suffixes: T tokens, K top-k, N = T K copies, D d_model, F expert width, E experts,
n tiles, m rows per tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dpo_jax.models.layers import activation

KERNELS = ("ragged_dot", "tiled")


def default_kernel() -> str:
    """``tiled`` on the CPU backend (where `ragged_dot` runs every expert), else
    ``ragged_dot``."""
    return "tiled" if jax.default_backend() == "cpu" else "ragged_dot"


@functools.partial(jax.custom_vjp)
def tiled_matmul(x_nmD: jax.Array, w_EDF: jax.Array, expert_n: jax.Array) -> jax.Array:
    """Grouped matmul on tiles: out[t] = x[t] @ w[expert[t]] ([n, m, D] x [E, D, F] ->
    [n, m, F]); a tile with expert -1 is skipped (its output is 0)."""
    return _tiles_forward(x_nmD, w_EDF, expert_n)


def _tiles_forward(x_nmD, w_EDF, expert_n):
    F = w_EDF.shape[-1]

    def body(_, xs):
        x_mD, e = xs
        y_mF = jax.lax.cond(e >= 0, lambda: x_mD @ w_EDF[jnp.maximum(e, 0)],
                            lambda: jnp.zeros((x_mD.shape[0], F), x_mD.dtype))
        return None, y_mF

    return jax.lax.scan(body, None, (x_nmD, expert_n))[1]


def _tiled_fwd(x_nmD, w_EDF, expert_n):
    return _tiles_forward(x_nmD, w_EDF, expert_n), (x_nmD, w_EDF, expert_n)


def _tiled_bwd(res, dy_nmF):
    x_nmD, w_EDF, expert_n = res

    def body(dw_EDF, xs):
        x_mD, dy_mF, e = xs

        def used(dw_EDF):
            i = jnp.maximum(e, 0)
            dw_DF = dw_EDF[i] + jnp.matmul(x_mD.T, dy_mF, preferred_element_type=jnp.float32)
            return (jax.lax.dynamic_update_index_in_dim(dw_EDF, dw_DF, i, 0),
                    dy_mF @ w_EDF[i].T)

        return jax.lax.cond(e >= 0, used, lambda dw: (dw, jnp.zeros_like(x_mD)), dw_EDF)

    dw_EDF, dx_nmD = jax.lax.scan(body, jnp.zeros(w_EDF.shape, jnp.float32),
                                  (x_nmD, dy_nmF, expert_n))
    return dx_nmD, dw_EDF.astype(w_EDF.dtype), None


tiled_matmul.defvjp(_tiled_fwd, _tiled_bwd)


def tile_rows(n_copies: int, n_experts: int, tile: int) -> int:
    """Rows per tile: `tile`, or the power of two >= n_copies / n_experts when that is smaller
    (at least 8), so few tokens (sampling) are not padded to E whole tiles of `tile` rows."""
    per_expert = max(8, -(-n_copies // n_experts))
    return min(tile, 1 << (per_expert - 1).bit_length())


def _sort_by_expert(index_TK: jax.Array, n_experts: int):
    """(order [N]: copy ids sorted by expert, stable; group sizes [E] int32; each sorted copy's
    rank within its expert's group [N])."""
    expert_N = index_TK.reshape(-1)
    order_N = jnp.argsort(expert_N, stable=True)
    sizes_E = jnp.bincount(expert_N, length=n_experts).astype(jnp.int32)
    starts_E = jnp.cumsum(sizes_E) - sizes_E
    rank_N = jnp.arange(expert_N.shape[0], dtype=jnp.int32) - starts_E[expert_N[order_N]]
    return order_N, sizes_E, rank_N


def sparse_experts(act: str, x_TD: jax.Array, index_TK: jax.Array, weight_TK: jax.Array,
                   gate_EDF: jax.Array, up_EDF: jax.Array, down_EFD: jax.Array,
                   kernel: str | None = None, tile: int = 128) -> jax.Array:
    """sum_k weight[t, k] * down_e(act(gate_e x_t) * up_e x_t) with e = index[t, k], computed on
    the selected experts only (dropless).

    x_TD [T, D] (compute dtype); index_TK int [T, K] expert ids; weight_TK [T, K] router weights
    (float32); gate / up [E, D, F], down [E, F, D] in the compute dtype; `act` an activation
    name of layers.activation; kernel: one of KERNELS or None (default_kernel()); tile: rows per
    tile of the tiled kernel (tile_rows). Returns [T, D] in the dtype of x. ValueError on an
    unknown kernel.
    """
    kernel = kernel or default_kernel()
    if kernel not in KERNELS:
        raise ValueError(f"moe_kernel must be one of {KERNELS} or None, got {kernel!r}")
    index_TK = jnp.asarray(index_TK, jnp.int32)
    T, K = index_TK.shape
    E, D = gate_EDF.shape[0], x_TD.shape[-1]
    order_N, sizes_E, rank_N = _sort_by_expert(index_TK, E)
    token_N = order_N // K  # the token of each sorted copy
    if kernel == "ragged_dot":
        xs_ND = x_TD[token_N]
        mm = lambda h, w: jax.lax.ragged_dot(h, w, sizes_E)
        ys_ND = mm(activation(act, mm(xs_ND, gate_EDF)) * mm(xs_ND, up_EDF), down_EFD)
    else:
        m = tile_rows(T * K, E, tile)
        padded_E = -(-sizes_E // m) * m
        pstart_E = jnp.cumsum(padded_E) - padded_E
        n = -(-(T * K + E * (m - 1)) // m)  # tiles: the static bound on the padded rows
        dest_N = pstart_E[index_TK.reshape(-1)[order_N]] + rank_N
        rows = jnp.zeros((n * m, D), x_TD.dtype).at[dest_N].set(x_TD[token_N],
                                                                unique_indices=True)
        pend_E = jnp.cumsum(padded_E)
        first_n = jnp.arange(n, dtype=jnp.int32) * m
        expert_n = jnp.sum(pend_E[None, :] <= first_n[:, None], axis=1).astype(jnp.int32)
        expert_n = jnp.where(first_n < pend_E[-1], expert_n, -1)
        x_nmD = rows.reshape(n, m, D)
        mm = lambda h, w: tiled_matmul(h, w, expert_n)
        y_nmD = mm(activation(act, mm(x_nmD, gate_EDF)) * mm(x_nmD, up_EDF), down_EFD)
        ys_ND = y_nmD.reshape(n * m, D)[dest_N]
    copies_ND = jnp.zeros_like(ys_ND).at[order_N].set(ys_ND, unique_indices=True)
    return jnp.einsum("tkd,tk->td", copies_ND.reshape(T, K, D), weight_TK.astype(x_TD.dtype))
