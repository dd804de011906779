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

Expert weights may be a QLoRA base's quantised experts (``quant.Experts``, a LoRA run's
``model.lora.base_quant``): the tiled kernel dequantises each tile's expert inside its scan
step (forward, and again in the backward for the input gradient; the frozen base gets no
gradient), so at most one expert's matrix is dequantised at a time; ``ragged_dot`` takes the
``[E, D, F]`` operand whole, so there one layer's experts of that matrix are dequantised inside
``jax.checkpoint`` (recomputed in the backward, never stored).

Shape suffixes: T tokens, K top-k, N = T K copies, D d_model, F expert width, E experts,
n tiles, m rows per tile.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.models import quant
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


@functools.partial(jax.custom_vjp)
def quant_tiled_matmul(x_nmD: jax.Array, w: quant.Experts, expert_n: jax.Array) -> jax.Array:
    """:func:`tiled_matmul` with quantised experts ``w`` (standing for [E, D, F]): each tile
    dequantises its own expert's [D, F] (in x's dtype) inside the scan step. Differentiable in
    x only (the frozen base gets no gradient): the backward scans again, dequantising each
    tile's expert for dx = dy @ w[e]^T."""
    return _quant_tiles(x_nmD, w, expert_n, False)


def _quant_tiles(x_nmD, w, expert_n, transpose):
    F = w.in_dim if transpose else w.out_dim

    def body(_, xs):
        x_mD, e = xs

        def used():
            w_DF = w.expert(jnp.maximum(e, 0), x_mD.dtype)
            return x_mD @ (w_DF.T if transpose else w_DF)

        return None, jax.lax.cond(e >= 0, used,
                                  lambda: jnp.zeros((x_mD.shape[0], F), x_mD.dtype))

    return jax.lax.scan(body, None, (x_nmD, expert_n))[1]


def _quant_tiled_fwd(x_nmD, w, expert_n):
    return _quant_tiles(x_nmD, w, expert_n, False), (w, expert_n)


def _quant_tiled_bwd(res, dy_nmF):
    w, expert_n = res
    zero_w = jax.tree.map(_zero_cotangent, w)
    return _quant_tiles(dy_nmF, w, expert_n, True), zero_w, None


def _zero_cotangent(x):
    """A zero cotangent for a primal leaf (float0 for an integer one)."""
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


quant_tiled_matmul.defvjp(_quant_tiled_fwd, _quant_tiled_bwd)


def n_experts(w) -> int:
    """E of an expert weight: a float [E, ...] array or ``quant.Experts``."""
    return w.n if isinstance(w, quant.Experts) else w.shape[0]


def _ragged(h_RD: jax.Array, w, sizes_E: jax.Array) -> jax.Array:
    """``jax.lax.ragged_dot(h, w, sizes)``; quantised ``w``: its layer's experts dequantised
    inside ``jax.checkpoint`` (the backward recomputes them from the codes)."""
    if isinstance(w, quant.Experts):
        return jax.checkpoint(lambda h, w, s: jax.lax.ragged_dot(h, w.whole(h.dtype), s))(
            h_RD, w, sizes_E)
    return jax.lax.ragged_dot(h_RD, w, sizes_E)


def _tiled(x_nmD: jax.Array, w, expert_n: jax.Array) -> jax.Array:
    if isinstance(w, quant.Experts):
        return quant_tiled_matmul(x_nmD, w, expert_n)
    return tiled_matmul(x_nmD, w, expert_n)


def tile_rows(n_copies: int, n_experts: int, tile: int) -> int:
    """Rows per tile: `tile`, or the power of two >= n_copies / n_experts when that is smaller
    (at least 8), so few tokens (sampling) are not padded to E whole tiles of `tile` rows."""
    per_expert = max(8, -(-n_copies // n_experts))
    return min(tile, 1 << (per_expert - 1).bit_length())


def sort_by_expert(index_TK: jax.Array, n_experts: int):
    """(order [N]: copy ids sorted by expert, stable; group sizes [E] int32). Ids >= n_experts
    (padding copies) sort last and are not counted."""
    expert_N = index_TK.reshape(-1)
    order_N = jnp.argsort(expert_N, stable=True)
    sizes_E = jnp.bincount(expert_N, length=n_experts + 1)[:n_experts].astype(jnp.int32)
    return order_N, sizes_E


def grouped_mlp(act: str, xs_RD: jax.Array, sizes_E: jax.Array, gate_EDF: jax.Array,
                up_EDF: jax.Array, down_EFD: jax.Array, kernel: str, tile: int) -> jax.Array:
    """Each expert's gated MLP down_e(act(gate_e x) * up_e x) on its own group of rows.

    xs_RD [R, D]: rows sorted by expert, expert e's `sizes_E[e]` rows after those of experts
    < e; rows past sum(sizes_E) belong to no expert (their output is 0). gate / up [E, D, F],
    down [E, F, D] (or ``quant.Experts`` standing for them); kernel one of KERNELS. Returns
    [R, D] in the dtype of xs."""
    R, D = xs_RD.shape
    E = sizes_E.shape[0]
    ends_E = jnp.cumsum(sizes_E)
    expert_R = jnp.searchsorted(ends_E, jnp.arange(R, dtype=jnp.int32), side="right")
    valid_R = expert_R < E
    if kernel == "ragged_dot":
        mm = lambda h, w: _ragged(h, w, sizes_E)
        ys_RD = mm(activation(act, mm(xs_RD, gate_EDF)) * mm(xs_RD, up_EDF), down_EFD)
        return jnp.where(valid_R[:, None], ys_RD, 0)
    m = tile_rows(R, E, tile)
    e_R = jnp.minimum(expert_R, E - 1)
    padded_E = -(-sizes_E // m) * m
    pend_E = jnp.cumsum(padded_E)
    n = -(-(R + E * (m - 1)) // m)  # tiles: the static bound on the padded rows
    rank_R = jnp.arange(R, dtype=jnp.int32) - (ends_E - sizes_E)[e_R]
    dest_R = jnp.where(valid_R, (pend_E - padded_E)[e_R] + rank_R, n * m)  # n m: dropped
    rows = jnp.zeros((n * m, D), xs_RD.dtype).at[dest_R].set(xs_RD, mode="drop",
                                                            unique_indices=True)
    first_n = jnp.arange(n, dtype=jnp.int32) * m
    expert_n = jnp.sum(pend_E[None, :] <= first_n[:, None], axis=1).astype(jnp.int32)
    expert_n = jnp.where(first_n < pend_E[-1], expert_n, -1)
    x_nmD = rows.reshape(n, m, D)
    mm = lambda h, w: _tiled(h, w, expert_n)
    y_nmD = mm(activation(act, mm(x_nmD, gate_EDF)) * mm(x_nmD, up_EDF), down_EFD)
    return y_nmD.reshape(n * m, D).at[dest_R].get(mode="fill", fill_value=0)


def check_kernel(kernel: str | None) -> str:
    """`kernel` or default_kernel(); ValueError unless one of KERNELS."""
    kernel = kernel or default_kernel()
    if kernel not in KERNELS:
        raise ValueError(f"moe_kernel must be one of {KERNELS} or None, got {kernel!r}")
    return kernel


def combine(ys_ND: jax.Array, order_N: jax.Array, weight_TK: jax.Array) -> jax.Array:
    """Outputs of the copies in expert order [N, D] -> sum_k weight[t, k] * copy (t, k): [T, D]."""
    T, K = weight_TK.shape
    copies_ND = jnp.zeros_like(ys_ND).at[order_N].set(ys_ND, unique_indices=True)
    return jnp.einsum("tkd,tk->td", copies_ND.reshape(T, K, -1), weight_TK.astype(ys_ND.dtype))


def sparse_experts(act: str, x_TD: jax.Array, index_TK: jax.Array, weight_TK: jax.Array,
                   gate_EDF: jax.Array, up_EDF: jax.Array, down_EFD: jax.Array,
                   kernel: str | None = None, tile: int = 128) -> jax.Array:
    """sum_k weight[t, k] * down_e(act(gate_e x_t) * up_e x_t) with e = index[t, k], computed on
    the selected experts only (dropless).

    x_TD [T, D] (compute dtype); index_TK int [T, K] expert ids; weight_TK [T, K] router weights
    (float32); gate / up [E, D, F], down [E, F, D] in the compute dtype (or quantised:
    ``quant.Experts``, dequantised to x's dtype inside the matmuls); `act` an activation
    name of layers.activation; kernel: one of KERNELS or None (default_kernel()); tile: rows per
    tile of the tiled kernel (tile_rows). Returns [T, D] in the dtype of x. ValueError on an
    unknown kernel.
    """
    kernel = check_kernel(kernel)
    index_TK = jnp.asarray(index_TK, jnp.int32)
    K = index_TK.shape[1]
    order_N, sizes_E = sort_by_expert(index_TK, n_experts(gate_EDF))
    ys_ND = grouped_mlp(act, x_TD[order_N // K], sizes_E, gate_EDF, up_EDF, down_EFD, kernel,
                        tile)
    return combine(ys_ND, order_N, weight_TK)
