"""Context parallelism: every sequence split along its length over the mesh axis ``context``.

The token arrays of a batch are sharded ``[rows, length]`` over ``(data, fsdp)`` x ``context``
(``dpo_jax.sharding.batch_shardings``) and the residual stream ``[B, T, D]`` between layers stays
split along T: norms, projections, MLPs and rotary embeddings act per token and need no
exchange. Two places look across the split:

* **Attention** (:func:`attention`). Under ``jax.shard_map`` over the ``context`` axis alone (the
  other mesh axes stay automatic, so rows stay on ``data``/``fsdp`` and heads on ``tensor``),
  each device all-gathers the keys and values of the whole sequence, together with the
  key-side per-token metadata (segment ids, positions, prefix-sharing branch ids), and attends
  from its own T / c queries to all T keys. The mask of any query block against the keys is
  rebuilt on the device from that metadata and the global column indices
  (:func:`block_mask`, the same rule as ``layers.segment_causal_mask``), so packing, prefix
  sharing, sliding windows (in columns, or in positions on branched rows) and Gemma 2's score
  soft-cap hold by construction, and no [T, T] mask ever exists. The result is exact: every
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
  keeps arbitrary masks (documents, trees) trivial. Past a few hundred thousand tokens, or
  without GQA, the ring's bounded memory wins; it is not implemented here.

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

import flax
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dpo_jax.models import layers

AXIS = "context"  # dpo_jax.sharding.CONTEXT_AXIS
NO_WINDOW = 2 ** 30  # the window of a full-attention layer when a traced window is needed


@flax.struct.dataclass
class TokenMeta:
    """The per-token metadata the attention mask is built from, in place of a [B, 1, T, S]
    mask (the decoder passes it to the layers under context parallelism).

    segment_ids [B, T] int (0 = padding), positions [B, T] int, branch_ids [B, T] int or None
    (prefix-shared rows, ``layers.segment_causal_mask``), window: None (no sliding window,
    static) or an int32 scalar (``NO_WINDOW`` for a full layer of a model that mixes both)."""

    segment_ids: jax.Array
    positions: jax.Array
    branch_ids: jax.Array | None = None
    window: jax.Array | None = None


def context_mesh():
    """The mesh of the surrounding ``jax.set_mesh`` when it has a ``context`` axis of more than
    one device (context parallelism on), else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AXIS not in mesh.axis_names or mesh.shape[AXIS] == 1:
        return None
    return mesh


def token_meta(segment_ids_BT, positions_BT, branch_ids_BT=None, window=None) -> TokenMeta:
    """:class:`TokenMeta` of a batch; ``window`` an int (sliding layers), None, or a traced
    scalar."""
    if window is not None:
        window = jnp.asarray(window, jnp.int32)
    return TokenMeta(segment_ids_BT, positions_BT, branch_ids_BT, window)


def block_mask(q: TokenMeta, q_cols, k: TokenMeta, k_cols) -> jax.Array:
    """[B, 1, Tq, Sk] bool: which keys (metadata ``k`` [B, Sk], global columns ``k_cols`` [Sk])
    each query (``q`` [B, Tq], ``q_cols`` [Tq]) sees; the window is ``q``'s.

    The rule of ``layers.segment_causal_mask`` for any block of queries against any block of
    keys: key column <= query column, same segment, and with branch ids the key on the prompt
    (branch 0) or on the query's branch; a sliding window in columns (``q_col - k_col <
    window``), or in positions on branched rows. For ``q_cols = k_cols = arange(L)`` it is
    ``segment_causal_mask`` exactly (tests/test_context_parallel.py)."""
    delta = q_cols[:, None] - k_cols[None, :]
    causal = (delta >= 0)[None]
    window = q.window
    if window is not None and q.branch_ids is None:
        causal = causal & (delta < window)[None]
    same = q.segment_ids[:, :, None] == k.segment_ids[:, None, :]
    if q.branch_ids is not None:
        key_branch = k.branch_ids[:, None, :]
        same = same & ((key_branch == 0) | (key_branch == q.branch_ids[:, :, None]))
        if window is not None:
            same = same & (q.positions[:, :, None] - k.positions[:, None, :] < window)
    return (causal & same)[:, None]


def attention(cfg, q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, meta: TokenMeta,
              mesh=None) -> jax.Array:
    """Exact attention of the whole sequence with T split over the ``context`` axis of ``mesh``
    (None: :func:`context_mesh`): the module docstring's all-gather scheme. q [B, T, N, H], k/v
    [B, T, K, H], ``meta`` the tokens' :class:`TokenMeta` -> [B, T, N, H], the same as
    ``layers.attention`` with ``layers.segment_causal_mask`` of ``meta`` (float32 round-off).
    ``cfg``: the model's scale, soft-cap, attention_impl ('chunked': query blocks of
    attention_chunk rows). T need not divide by the axis: padding tokens (segment 0, after the
    last column, seen by no real query) are added and dropped. ValueError without a context
    axis of more than one device."""
    mesh = context_mesh() if mesh is None else mesh
    if mesh is None or AXIS not in mesh.axis_names:
        raise ValueError("context_parallel.attention needs a mesh with a 'context' axis "
                         "(jax.set_mesh)")
    c = mesh.shape[AXIS]
    T = q_BTNH.shape[1]
    pad = -T % c
    if pad:
        pad_t = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))  # noqa: E731
        q_BTNH, k_BTKH, v_BTKH = pad_t(q_BTNH), pad_t(k_BTKH), pad_t(v_BTKH)
        meta = meta.replace(segment_ids=pad_t(meta.segment_ids), positions=pad_t(meta.positions),
                            branch_ids=None if meta.branch_ids is None else pad_t(meta.branch_ids))
    chunk = cfg.attention_chunk if cfg.attention_impl == "chunked" else None
    local = functools.partial(_local_attention, layers.attention_scale(cfg),
                              cfg.attn_logit_softcap, chunk)
    seq = P(None, AXIS)
    meta_specs = jax.tree.map(lambda x: P() if jnp.ndim(x) == 0 else seq, meta)
    out = jax.shard_map(local, mesh=mesh, in_specs=(seq, seq, seq, meta_specs), out_specs=seq,
                        axis_names={AXIS})(q_BTNH, k_BTKH, v_BTKH, meta)
    return out[:, :T] if pad else out


def _local_attention(scale, cap, chunk, q_BTNH, k_BTKH, v_BTKH, meta: TokenMeta):
    """One device's part: its Tl queries against the gathered S = c Tl keys."""
    Tl = q_BTNH.shape[1]
    gather = lambda x: jax.lax.all_gather(x, AXIS, axis=1, tiled=True)  # noqa: E731
    k_BSKH, v_BSKH = gather(k_BTKH), gather(v_BTKH)
    key = TokenMeta(gather(meta.segment_ids), gather(meta.positions),
                    None if meta.branch_ids is None else gather(meta.branch_ids), meta.window)
    S = k_BSKH.shape[1]
    k_cols = jnp.arange(S)
    q_cols = jax.lax.axis_index(AXIS) * Tl + jnp.arange(Tl)

    def run(q_BCNH, m: TokenMeta, cols_C, real_C):
        mask = block_mask(m, cols_C, key, k_cols) | ~real_C[None, None, :, None]
        return layers._dense_attention(q_BCNH, k_BSKH, v_BSKH, mask, scale, cap)

    real = jnp.ones((Tl,), bool)
    if chunk is None or Tl <= chunk:
        return run(q_BTNH, meta, q_cols, real)
    B, _, N, H = q_BTNH.shape
    n = -(-Tl // chunk)
    extra = n * chunk - Tl
    pad = lambda x, v=0: jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2),  # noqa
                                 constant_values=v)
    # padded query rows see every key (no empty softmax row) and are dropped
    q_cols = jnp.pad(q_cols, (0, extra))
    real = jnp.pad(real, (0, extra))
    blocks = lambda x: jnp.moveaxis(x.reshape(x.shape[0], n, chunk, *x.shape[2:]), 1, 0)  # noqa
    q_n = blocks(pad(q_BTNH))
    m_n = TokenMeta(blocks(pad(meta.segment_ids)), blocks(pad(meta.positions)),
                    None if meta.branch_ids is None else blocks(pad(meta.branch_ids)), None)

    @jax.checkpoint
    def one(args):
        q_i, m_i, cols_i, real_i = args
        return run(q_i, m_i.replace(window=meta.window), cols_i, real_i)

    out = jax.lax.map(one, (q_n, m_n, q_cols.reshape(n, chunk), real.reshape(n, chunk)))
    return jnp.moveaxis(out, 0, 1).reshape(B, n * chunk, N, H)[:, :Tl]


def constrain_sequence(x_BT):
    """``x`` [B, T, ...] constrained to be split along T over the context axis (the other
    dimensions left to the compiler); ``x`` itself without context parallelism, or when T does
    not divide (a KV-cache step) or ``x`` has fewer than 3 dimensions."""
    mesh = context_mesh()
    if mesh is None or x_BT.ndim < 3 or x_BT.shape[1] % mesh.shape[AXIS]:
        return x_BT
    free = P.UNCONSTRAINED
    return jax.lax.with_sharding_constraint(x_BT, P(free, AXIS, *([free] * (x_BT.ndim - 2))))
