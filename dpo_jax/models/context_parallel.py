"""Context parallelism: every sequence split along its length over the mesh axis ``context``.

The token arrays of a batch are sharded ``[rows, length]`` over ``(data, fsdp)`` x ``context``
(``dpo_jax.sharding.batch_shardings``) and the residual stream ``[B, T, D]`` between layers stays
split along T: norms, projections, MLPs and rotary embeddings act per token and need no
exchange. Two places look across the split:

* **Attention** (:func:`attention`). Under ``jax.shard_map`` over the ``context`` axis alone (the
  other mesh axes stay automatic, so rows stay on ``data``/``fsdp`` and heads on ``tensor``),
  each device all-gathers the keys and values of the whole sequence, together with the
  key-side per-token metadata (``layers.TokenMeta``: global columns, segment ids, positions,
  preference-tree / prefix-sharing DFS intervals), and attends from its own T / c queries to
  all T keys. The mask of any query block against the keys is rebuilt on the device from that
  metadata (``layers.block_mask``, the rule the unsharded model uses), so packing, prefix
  sharing, preference trees, sliding windows and Gemma 2's score soft-cap hold by
  construction, and no [T, T] mask ever exists. The result is exact: every
  query row sees every key and takes the plain softmax (the same numbers as the unsharded
  model to float32 summation order). The backward pass is the transpose of the all-gather, a
  reduce-scatter of the keys' and values' gradients, which ``shard_map`` derives.

  *Why all-gather and not a ring.* Ring attention (Liu et al. 2023) passes K/V blocks around
  the c devices with ``ppermute`` and merges the partial softmaxes online: its memory per device
  is one K/V block instead of the whole sequence's, at the price of c sequential exchange
  steps per layer and a hand-written online softmax in the backward pass. With grouped-query
  attention K and V are n_kv_head / n_head of the queries' size (Llama-3.1-8B: 8 / 32), so the
  gathered keys and values of a 128k sequence are 128k x 2 x 8 x 128 x 2 bytes = 512 MiB per
  row and layer in bfloat16, recomputed (not stored) under remat: small next to an 80 GiB
  device, and one collective per layer that XLA can overlap. This is the choice of Llama 3
  (Dubey et al. 2024, sec. 3.3.2: all-gather K/V, then local attention), also because it
  keeps arbitrary masks (documents, trees) trivial. Measured (docs/scale.md, Long context),
  the per-device memory at 128k is dominated by the float32 score blocks [B, N, chunk, T],
  which ``attention_chunk`` sets (a ring's blocks would be [B, N, chunk, T / c]), and by the
  residual stream, not by the gathered K/V. Past a few hundred thousand tokens, or without
  GQA, the ring's bounded memory wins; it is not implemented here.

  Query blocks: with ``attention_impl='chunked'`` the local queries run in blocks of
  ``attention_chunk`` rows under ``jax.checkpoint`` (as ``layers.chunked_attention``), so the
  float32 scores are ``[B, N, chunk, T]`` at a time; else one block of T / c rows.
  Load balance: each device scores its queries against every key (the masked half included,
  as the unsharded XLA path does), so the work is the same on every device whatever the
  causal mask.

* **Log-probs** (``dpo_jax.logprobs.sequence_logps``): each device applies the LM head to its
  own positions (the targets are shifted by one token across the split first, a halo of one
  int per row) and the per-sequence sums are ``psum``-ed over the axis.

The functions here are traced under ``jax.set_mesh(mesh)``; :func:`context_mesh` reads the
mesh. Shape suffixes: B rows, T tokens (global), Tl = T / c local tokens, S keys (= T), N query
heads, K kv heads, H head dim, c devices on the context axis.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dpo_jax.models import layers

AXIS = "context"  # dpo_jax.sharding.CONTEXT_AXIS


def context_mesh():
    """The mesh of the surrounding ``jax.set_mesh`` when it has a ``context`` axis of more than
    one device (context parallelism on), else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AXIS not in mesh.axis_names or mesh.shape[AXIS] == 1:
        return None
    return mesh


def attention(cfg, q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array,
              mask: layers.MetaMask, mesh=None) -> jax.Array:
    """Exact self-attention of the whole sequence with T split over the ``context`` axis of
    ``mesh`` (None: :func:`context_mesh`): the module docstring's all-gather scheme. q [B, T,
    N, H], k/v [B, T, K, H], ``mask`` the tokens' ``layers.MetaMask`` (metadata of the whole
    rows, global columns; its window None, an int or a traced scalar) -> [B, T, N, H], the
    same as ``layers.attention`` with that mask (float32 round-off). ``cfg``: the model's
    scale, soft-cap, attention_impl ('chunked': query blocks of attention_chunk rows). T need
    not divide by the axis: padding tokens (segment 0, after the last column, seen by no real
    query) are added and dropped. ValueError without a context axis or a MetaMask."""
    mesh = context_mesh() if mesh is None else mesh
    if mesh is None or AXIS not in mesh.axis_names:
        raise ValueError("context_parallel.attention needs a mesh with a 'context' axis "
                         "(jax.set_mesh)")
    if not isinstance(mask, layers.MetaMask):
        raise ValueError("context_parallel.attention takes a layers.MetaMask (per-token "
                         "metadata), not a materialised mask")
    meta, window = mask
    c = mesh.shape[AXIS]
    T = q_BTNH.shape[1]
    pad = -T % c
    if pad:
        pad_t = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        q_BTNH, k_BTKH, v_BTKH = pad_t(q_BTNH), pad_t(k_BTKH), pad_t(v_BTKH)
        # padding: segment 0, tree node (0, 0), columns after the last
        meta = jax.tree.map(pad_t, meta)._replace(column=jnp.broadcast_to(
            jnp.arange(T + pad, dtype=meta.column.dtype), (meta.column.shape[0], T + pad)))
    chunk = cfg.attention_chunk if cfg.attention_impl == "chunked" else None
    static_window = window if window is None or isinstance(window, int) else None
    local = functools.partial(_local_attention, layers.attention_scale(cfg),
                              cfg.attn_logit_softcap, chunk, static_window)
    seq = P(None, AXIS)
    traced = () if static_window is not None or window is None else (jnp.asarray(window),)
    out = jax.shard_map(local, mesh=mesh,
                        in_specs=(seq, seq, seq, jax.tree.map(lambda _: seq, meta),
                                  tuple(P() for _ in traced)),
                        out_specs=seq, axis_names={AXIS})(q_BTNH, k_BTKH, v_BTKH, meta, traced)
    return out[:, :T] if pad else out


def _local_attention(scale, cap, chunk, window, q_BTNH, k_BTKH, v_BTKH,
                     meta: layers.TokenMeta, traced):
    """One device's part: its Tl queries (metadata ``meta``) against the gathered S = c Tl
    keys. ``window``: the static window, or None with ``traced`` = (the traced window,)."""
    if traced:
        window = traced[0]
    Tl = q_BTNH.shape[1]
    gather = lambda x: jax.lax.all_gather(x, AXIS, axis=1, tiled=True)  # noqa: E731
    k_BSKH, v_BSKH = gather(k_BTKH), gather(v_BTKH)
    key = jax.tree.map(gather, meta)  # the key-side metadata travels with the keys

    def run(q_BCNH, m: layers.TokenMeta):
        return layers._dense_attention(q_BCNH, k_BSKH, v_BSKH,
                                       layers.block_mask(m, key, window), scale, cap)

    if chunk is None or Tl <= chunk:
        return run(q_BTNH, meta)
    B, _, N, H = q_BTNH.shape
    n = -(-Tl // chunk)
    extra = n * chunk - Tl
    # padded query rows repeat the last row's metadata (a non-empty row), then are dropped
    q_n = jnp.moveaxis(jnp.pad(q_BTNH, ((0, 0), (0, extra), (0, 0), (0, 0))).reshape(
        B, n, chunk, N, H), 1, 0)
    m_n = jax.tree.map(lambda a: jnp.moveaxis(jnp.pad(a, ((0, 0), (0, extra)), mode="edge")
                                              .reshape(B, n, chunk), 1, 0), meta)

    @jax.checkpoint
    def one(args):
        return run(*args)

    out = jax.lax.map(one, (q_n, m_n))
    return jnp.moveaxis(out, 0, 1).reshape(B, n * chunk, N, H)[:, :Tl]


ROW_AXES = ("data", "fsdp")  # dpo_jax.sharding.BATCH_AXES


def constrain_sequence(x_BT):
    """``x`` [B, T, ...] (an activation) constrained to the batch's layout under the surrounding
    ``jax.set_mesh``: rows over (data, fsdp) and, with context parallelism, T over ``context``,
    each where it divides; the other dimensions left to the compiler. Without the row
    constraint XLA may gather the rows of every device (measured: a [B T, F] MLP activation
    of all 16 rows on each device of a 16-way fsdp mesh), and without the sequence one it
    gathers the tokens. ``x`` itself without a mesh or with fewer than 3 dimensions."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or x_BT.ndim < 3:
        return x_BT
    free = P.UNCONSTRAINED
    rows = tuple(a for a in ROW_AXES if a in mesh.axis_names and mesh.shape[a] > 1)
    n = 1
    for a in rows:
        n *= mesh.shape[a]
    row_spec = (rows if len(rows) > 1 else rows[0]) if rows and x_BT.shape[0] % n == 0 else free
    c = mesh.shape[AXIS] if AXIS in mesh.axis_names else 1
    seq_spec = AXIS if c > 1 and x_BT.shape[1] % c == 0 else free
    if row_spec is free and seq_spec is free:
        return x_BT
    return jax.lax.with_sharding_constraint(x_BT, P(row_spec, seq_spec,
                                                    *([free] * (x_BT.ndim - 2))))
