"""Pure functions shared by the decoder: norms, activations, rotary embeddings, attention masks.

Kept free of nnx so the numerics (float32 norms / softmax / rotary) are easy to read and test.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dpo_jax.models.config import ModelConfig


def norm(cfg: ModelConfig, x: jax.Array, scale: jax.Array, bias: jax.Array | None) -> jax.Array:
    """LayerNorm or RMSNorm over the last axis computed in float32 (bf16 statistics are too
    noisy), cast back; scale (and bias) broadcast against it."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if cfg.norm == "layernorm":
        mean = jnp.mean(x, axis=-1, keepdims=True)
        x = x - mean
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    scale = scale.astype(jnp.float32)
    if cfg.norm_unit_offset:  # Gemma stores w with the norm's scale being (1 + w)
        scale = 1.0 + scale
    y = x * jax.lax.rsqrt(var + cfg.norm_eps) * scale
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return y.astype(dtype)


def activation(name: str, x: jax.Array) -> jax.Array:
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "silu":
        return jax.nn.silu(x)
    return jax.nn.relu(x)


def inv_frequencies(cfg: ModelConfig, local: bool = False, long: bool = False) -> jax.Array:
    """Rotary inverse frequencies [rotary_dim/2] with HF's rope scaling rules (linear, llama3,
    longrope: divided by the short factors, or the long ones with long=True).

    local=True with cfg.local_rope_theta set: the sliding layers' own unscaled rope (Gemma 3's
    rope_local_base_freq); otherwise every layer uses rope_theta and the scaling.
    """
    rd = cfg.rotary_dim
    if local and cfg.local_rope_theta is not None:
        return 1.0 / (cfg.local_rope_theta ** (jnp.arange(0, rd, 2, dtype=jnp.float32) / rd))
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, rd, 2, dtype=jnp.float32) / rd))
    if cfg.rope_scaling == "linear":
        inv = inv / cfg.rope_factor
    elif cfg.rope_scaling == "llama3":
        factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
        old = cfg.rope_original_max_len
        low_wavelen, high_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = jnp.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = jnp.where(medium, smoothed, scaled)
    elif cfg.rope_scaling == "longrope":
        factors = cfg.rope_long_factor if long else cfg.rope_short_factor
        inv = inv / jnp.asarray(factors, jnp.float32)
    return inv


def rotary_tables(cfg: ModelConfig, positions: jax.Array,
                  local: bool = False) -> tuple[jax.Array, jax.Array]:
    """sin, cos [B, T, rotary_dim/2] in float32 for integer positions [B, T] (local: the
    sliding layers' tables, see inv_frequencies).

    longrope (Phi-3 su / longrope), as transformers' `longrope_frequency_update`: the long
    factors for every position of the call when its largest position + 1 exceeds
    rope_original_max_len, else the short ones (one choice per forward, over all rows: a KV-cache
    step past the original length switches to the long factors while the cached keys keep the
    short ones, as in transformers), and sin, cos times rope_attention_factor.
    """
    inv = inv_frequencies(cfg, local)
    longrope = cfg.rope_scaling == "longrope" and not (local and cfg.local_rope_theta is not None)
    if longrope:
        long = jnp.max(positions) + 1 > cfg.rope_original_max_len
        inv = jnp.where(long, inv_frequencies(cfg, local, long=True), inv)
    ang = positions.astype(jnp.float32)[..., None] * inv
    sin, cos = jnp.sin(ang), jnp.cos(ang)
    if longrope:
        sin, cos = sin * cfg.rope_attention_factor, cos * cfg.rope_attention_factor
    return sin, cos


def apply_rotary(cfg: ModelConfig, x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotate the first rotary_dim dims of each head of x [B, T, N, Dh] (float32 math).

    half: pairs (i, i + rd/2) as NeoX/Llama `rotate_half`; interleaved: pairs (2i, 2i+1) as
    GPT-J `rotate_every_two`. Checkpoints are trained with one or the other, so it matters.
    """
    rd = cfg.rotary_dim
    dtype = x.dtype
    xr, xp = x[..., :rd].astype(jnp.float32), x[..., rd:]
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    if cfg.rotary_style == "half":
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2:]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
        out = out.reshape(xr.shape)
    return jnp.concatenate([out.astype(dtype), xp], axis=-1)


class TokenMeta(NamedTuple):
    """Per-token attention metadata of a block of columns, each field int32 ``[B, T]``.

    ``column``: the token's global column in its row (0 .. L-1), so that a block of queries and a
    block of keys taken from anywhere in the row (a query chunk, a context-parallel shard)
    still compare causally. ``segment_ids``: packed segments (0 = padding). ``positions``: the
    model's positions (the sliding window of tree rows is measured in them). ``tree_lo``,
    ``tree_hi``: the token's preference-tree node as a DFS interval (``dpo_jax.data.trees``):
    the node's entry index in a depth-first walk of its tree and the largest entry index in its
    subtree, so node a is an ancestor-or-self of node b iff ``lo_a <= lo_b <= hi_a``. Both None
    for rows without trees (every token of a segment on one path).
    """

    column: jax.Array
    segment_ids: jax.Array
    positions: jax.Array
    tree_lo: jax.Array | None = None
    tree_hi: jax.Array | None = None

    def slice(self, start: int, size: int) -> "TokenMeta":
        """Columns ``start .. start + size - 1`` of every field (``start`` may be traced)."""
        return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, size, 1), self)


def token_meta(segment_ids: jax.Array, positions: jax.Array,
               tree: tuple[jax.Array, jax.Array] | None = None,
               column: jax.Array | None = None) -> TokenMeta:
    """The :class:`TokenMeta` of whole rows: ``segment_ids``, ``positions`` [B, L], ``tree``
    ``(tree_lo, tree_hi)`` [B, L] or None, ``column`` [B, L] or None (``0 .. L-1``)."""
    B, L = segment_ids.shape
    if column is None:
        column = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    lo, hi = (None, None) if tree is None else tree
    return TokenMeta(column, segment_ids, positions, lo, hi)


# The DFS interval a prefix-shared prompt token gets from its branch ids: an ancestor of every
# branch of its segment.
_ROOT_HI = 2 ** 30


def branch_tree(branch_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(tree_lo, tree_hi)`` of prefix-shared rows (``dpo_jax.data.prefix``) from their
    ``branch_ids`` [B, L]: the shared prompt is the root, ``(0, 2**30)``, response branch k a
    leaf, ``(k, k)`` (a tree with one branch point)."""
    branch_ids = branch_ids.astype(jnp.int32)
    return branch_ids, jnp.where(branch_ids == 0, _ROOT_HI, branch_ids)


def block_mask(q: TokenMeta, k: TokenMeta, window: int | jax.Array | None = None) -> jax.Array:
    """[B, 1, Tq, Tk] bool: key j visible to query i.

    Visible iff same segment id, ``column_j <= column_i``, key j's tree node an
    ancestor-or-self of query i's (``lo_j <= lo_i <= hi_j``; skipped when the metadata carry no
    tree) and, with a sliding ``window`` (a static int or a traced int32 scalar), the distance
    is below it: HF's ``kv_idx > q_idx - sliding_window`` in columns for rows without trees
    (within a packed segment, the position difference), in positions (``pos_i - pos_j <
    window``) for tree rows, whose branches do not follow their ancestors' columns directly.

    Padding (segment 0) sees earlier padding incl. itself, so no query row of a full key range
    is empty (no NaN). ``q`` and ``k`` may be any blocks of the same rows (their ``column``
    fields give the causal order), e.g. one query chunk against all keys.
    """
    delta = q.column[:, :, None] - k.column[:, None, :]
    visible = (delta >= 0) & (q.segment_ids[:, :, None] == k.segment_ids[:, None, :])
    tree = q.tree_lo is not None
    if tree:
        lo_i = q.tree_lo[:, :, None]
        visible = visible & (k.tree_lo[:, None, :] <= lo_i) & (lo_i <= k.tree_hi[:, None, :])
    if window is not None:
        if tree:
            delta = q.positions[:, :, None] - k.positions[:, None, :]
        visible = visible & (delta < window)
    return visible[:, None]


def block_may_be_visible(q: TokenMeta, k: TokenMeta,
                         window: int | jax.Array | None = None) -> jax.Array:
    """bool []: False only when :func:`block_mask` (q, k, window) is all False in every row,
    decided from the blocks' metadata ranges alone (O(Tq + Tk), no [Tq, Tk] work).

    Each test is a necessary condition of some visible pair, per row: a key column not after
    the last query column (``min col_k <= max col_q``), overlapping segment-id ranges, with a
    tree ``min lo_k <= max lo_q`` and ``min lo_q <= max hi_k``, and with a window a distance
    below it (``min pos_q - max pos_k < window``, columns without a tree); the tree ranges are
    taken over the tokens of the segments both blocks hold. So a False is exact
    (the block can be skipped); a True may still be an empty block (computed, masked)."""
    lo_max = lambda a: (jnp.min(a, axis=1), jnp.max(a, axis=1))  # noqa: E731
    qc, kc = lo_max(q.column), lo_max(k.column)
    qs, ks = lo_max(q.segment_ids), lo_max(k.segment_ids)
    ok = (kc[0] <= qc[1]) & (ks[0] <= qs[1]) & (qs[0] <= ks[1])
    tree = q.tree_lo is not None
    if tree:  # over the tokens of the segments both blocks hold (padding apart)
        big = 2 ** 30
        q_in = (q.segment_ids >= ks[0][:, None]) & (q.segment_ids <= ks[1][:, None])
        k_in = (k.segment_ids >= qs[0][:, None]) & (k.segment_ids <= qs[1][:, None])
        ql_max = jnp.max(jnp.where(q_in, q.tree_lo, -big), axis=1)
        ql_min = jnp.min(jnp.where(q_in, q.tree_lo, big), axis=1)
        kl_min = jnp.min(jnp.where(k_in, k.tree_lo, big), axis=1)
        kh_max = jnp.max(jnp.where(k_in, k.tree_hi, -big), axis=1)
        ok = ok & (kl_min <= ql_max) & (ql_min <= kh_max)
    if window is not None:
        dist = (jnp.min(q.positions, axis=1) - jnp.max(k.positions, axis=1) if tree
                else qc[0] - kc[1])
        ok = ok & (dist < window)
    return jnp.any(ok)


class MetaMask(NamedTuple):
    """A self-attention mask given by per-token metadata rather than materialised: ``meta``
    (:class:`TokenMeta` of the call's T columns) and the sliding ``window`` (None, an int, or a
    traced int32 scalar per layer). ``dense()`` is ``block_mask(meta, meta, window)``."""

    meta: TokenMeta
    window: int | jax.Array | None = None

    def dense(self) -> jax.Array:
        return block_mask(self.meta, self.meta, self.window)


def segment_causal_mask(segment_ids: jax.Array, window: int | None = None,
                        branch_ids: jax.Array | None = None,
                        positions: jax.Array | None = None) -> jax.Array:
    """[B, 1, L, L] bool mask of whole rows, materialised: :func:`block_mask` of the rows'
    :func:`token_meta`, with prefix-shared rows' ``branch_ids`` [B, L] (0 on a segment's
    shared prompt, k >= 1 on its k-th response branch) read as a tree (:func:`branch_tree`).
    A sliding window over branched rows is measured in ``positions`` [B, L] (required then).
    """
    tree = None if branch_ids is None else branch_tree(branch_ids)
    if tree is not None and window is not None and positions is None:
        raise ValueError("segment_causal_mask: a sliding window over branched rows "
                         "needs positions (the window is measured in positions)")
    if positions is None:
        positions = jnp.zeros_like(segment_ids)
    meta = token_meta(segment_ids, positions, tree)
    return block_mask(meta, meta, window)


def attention_scale(cfg: ModelConfig) -> float:
    """Score scale: query_pre_attn_scalar**-0.5 (Gemma) or head_dim**-0.5."""
    base = cfg.query_pre_attn_scalar if cfg.query_pre_attn_scalar is not None else cfg.head_dim
    return float(base) ** -0.5


def attention(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array,
              mask: jax.Array | MetaMask) -> jax.Array:
    """q [B,T,N,Dh], k/v [B,S,K,Dh] (GQA when K < N), mask [B,1,T,S] bool or a
    :class:`MetaMask` (self-attention, S = T) -> [B,T,N,Dh].

    jax.nn.dot_product_attention keeps logits and softmax in float32 (XLA path) and can
    dispatch to cuDNN flash attention with attention_impl='cudnn'. attention_impl='chunked'
    runs the same over query blocks of cfg.attention_chunk rows (see chunked_attention; a
    MetaMask is then evaluated one block at a time, never as [B,1,T,S], and with
    cfg.attention_skip_blocks the key blocks it leaves empty are skipped; other paths
    materialise it). With cfg.attn_logit_softcap the scores go through softcapped_attention
    (jax's attention has no soft-capping). Sliding windows are part of `mask`.
    """
    scale, cap = attention_scale(cfg), cfg.attn_logit_softcap
    if cfg.attention_impl == "chunked":
        return chunked_attention(q, k, v, mask, cfg.attention_chunk, scale, cap,
                                 cfg.attention_skip_blocks)
    if isinstance(mask, MetaMask):
        mask = mask.dense()
    if cap is not None:
        return softcapped_attention(q, k, v, mask, scale, cap)
    impl = None if cfg.attention_impl in (None, "xla") else cfg.attention_impl
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)


def softcapped_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                         scale: float, cap: float) -> jax.Array:
    """Attention with Gemma 2's score soft-capping: s = cap * tanh(q.k * scale / cap), then
    the mask and a float32 softmax (as transformers' eager Gemma 2 attention).

    q [B,T,N,Dh], k/v [B,S,K,Dh] with N a multiple of K, mask [B,1,T,S] -> [B,T,N,Dh].
    """
    B, T, N, Dh = q.shape
    K = k.shape[2]
    q_g = q.reshape(B, T, K, N // K, Dh)
    s = jnp.einsum("btkgd,bskd->bkgts", q_g, k, preferred_element_type=jnp.float32) * scale
    s = cap * jnp.tanh(s / cap)
    s = jnp.where(mask[:, :, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(B, T, N, Dh)


def _dense_attention(q, k, v, mask, scale: float, cap: float | None) -> jax.Array:
    if cap is not None:
        return softcapped_attention(q, k, v, mask, scale, cap)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | MetaMask,
                      chunk: int, scale: float | None = None,
                      cap: float | None = None, skip_empty: bool = False) -> jax.Array:
    """Exact attention over query blocks of `chunk` rows, each block rematerialised.

    The dense XLA path keeps the float32 scores and probabilities [B, N, T, S] of every layer
    for the backward pass: at T = 8192 that is the memory wall (not the log-probs). Here a
    `lax.map` over query blocks computes [B, N, chunk, S] at a time and `jax.checkpoint`
    makes the backward recompute a block's scores instead of storing them, so the residuals
    are q, k, v and the mask: memory O(B*N*chunk*S) instead of O(B*N*T*S), same FLOPs plus
    one recomputed forward of the scores. Each query row still sees every key, so the
    softmax is the plain one (no online rescaling): same numbers as the dense path up to
    float summation order. T is padded to a multiple of chunk with fully visible rows, which
    are dropped afterwards. T <= chunk falls back to the dense path. scale None: head_dim**-0.5;
    cap: the score soft-cap (softcapped_attention) or None.

    `mask`: [B, 1, T, S] bool, or a :class:`MetaMask` (S = T), whose block of `chunk` query
    rows is computed inside the block from the per-token metadata (``block_mask``): the
    [B, 1, T, T] mask is never materialised and the residuals are the metadata. With a
    MetaMask and ``skip_empty`` (``ModelConfig.attention_skip_blocks``) the keys are split into blocks of `chunk` too and a
    (query block, key block) pair that the metadata leave empty in every row
    (:func:`block_may_be_visible`: the causal future, other segments, sibling branches of a
    tree, beyond the window) is skipped by a ``lax.cond``, in the forward and the backward;
    the visible key blocks are combined by the online softmax (running max and sum, as flash
    attention, Dao et al. 2022): exact, equal to the dense path up to float summation order.
    Its backward reruns the forward once more than the plain path (the whole map is
    rematerialised, see _blocked_attention), so it pays where the skipped blocks outweigh
    that: long rows, trees, packed segments (measured: experiments/bench/README.md).
    """
    B, T, N, Dh = q.shape
    scale = float(Dh) ** -0.5 if scale is None else scale
    if T <= chunk:
        return _dense_attention(q, k, v, mask.dense() if isinstance(mask, MetaMask) else mask,
                                scale, cap)
    if isinstance(mask, MetaMask) and skip_empty:
        return _blocked_attention(q, k, v, mask, chunk, scale, cap)
    S = k.shape[1]
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    q_blocks = jnp.moveaxis(q.reshape(B, n, chunk, N, Dh), 1, 0)  # [n, B, c, N, Dh]
    if isinstance(mask, MetaMask):
        meta, window = mask
        # Padded query rows repeat the last column's metadata (a non-empty row), then dropped.
        q_meta = jax.tree.map(lambda a: jnp.pad(a, ((0, 0), (0, pad)), mode="edge"), meta)
        m_blocks = jax.tree.map(lambda a: jnp.moveaxis(a.reshape(B, n, chunk), 1, 0), q_meta)

        def block_mask_of(m_i):
            return block_mask(m_i, meta, window)
    else:
        mask = jnp.broadcast_to(mask, (B, mask.shape[1], T, S))
        if pad:
            mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True)
        m_blocks = jnp.moveaxis(mask.reshape(B, mask.shape[1], n, chunk, S), 2, 0)  # [n,B,1,c,S]

        def block_mask_of(m_i):
            return m_i

    @jax.checkpoint
    def block(args):
        q_i, m_i = args
        return _dense_attention(q_i, k, v, block_mask_of(m_i), scale, cap)

    out = jax.lax.map(block, (q_blocks, m_blocks))  # [n, B, c, N, Dh]
    return jnp.moveaxis(out, 0, 1).reshape(B, n * chunk, N, Dh)[:, :T]


# Masked scores and the running max's start in the online softmax: finite, so that a key block
# with no visible key for some query row gives exp(0) * 0 rather than NaN.
_NEG = -1e30


def _blocked_attention(q, k, v, mask: MetaMask, chunk: int, scale: float, cap) -> jax.Array:
    """chunked_attention's query x key blocks with empty blocks skipped (see there). q
    [B,T,N,Dh], k/v [B,T,K,Dh] -> [B,T,N,Dh]."""
    B, T, N, Dh = q.shape
    K = k.shape[2]
    G = N // K
    meta, window = mask
    n = -(-T // chunk)
    pad = n * chunk - T
    # Padded query rows repeat the last column's metadata (non-empty rows, dropped after);
    # padded keys are never visible (a column after every query, segment -1).
    q_meta = jax.tree.map(lambda a: jnp.pad(a, ((0, 0), (0, pad)), mode="edge"), meta)
    k_meta = meta._replace(**{f: jnp.pad(getattr(meta, f), ((0, 0), (0, pad)),
                                         constant_values=c)
                              for f, c in (("column", 2 ** 30), ("segment_ids", -1))})
    k_meta = jax.tree.map(lambda a: jnp.pad(a, ((0, 0), (0, pad - (a.shape[1] - T)))), k_meta)
    pad4 = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = jnp.pad(q, pad4), jnp.pad(k, pad4), jnp.pad(v, pad4)
    blocks = lambda a: jnp.moveaxis(a.reshape(B, n, chunk, *a.shape[2:]), 1, 0)  # noqa: E731
    q_blocks = blocks(q).reshape(n, B, chunk, K, G, Dh)
    k_blocks, v_blocks = blocks(k), blocks(v)  # [n, B, c, K, Dh]
    qm_blocks = jax.tree.map(blocks, q_meta)
    km_blocks = jax.tree.map(blocks, k_meta)

    def one_key_block(q_i, m_i, carry, xs):
        k_j, v_j, km_j = xs

        def compute(carry):
            m, l, acc = carry  # [B, K, G, c] f32 (m, l), [B, K, G, c, Dh] f32
            s = jnp.einsum("bckgd,bskd->bkgcs", q_i, k_j,
                           preferred_element_type=jnp.float32) * scale
            if cap is not None:
                s = cap * jnp.tanh(s / cap)
            visible = block_mask(m_i, km_j, window)[:, :, None]  # [B, 1, 1, c, s]
            s = jnp.where(visible, s, _NEG)
            m_new = jax.lax.stop_gradient(jnp.maximum(m, jnp.max(s, axis=-1)))
            p = jnp.where(visible, jnp.exp(s - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            acc = acc * corr[..., None] + jnp.einsum(
                "bkgcs,bskd->bkgcd", p.astype(v_j.dtype), v_j,
                preferred_element_type=jnp.float32)
            return m_new, l * corr + jnp.sum(p, axis=-1), acc

        return jax.lax.cond(block_may_be_visible(m_i, km_j, window), compute,
                            lambda c: c, carry), None

    @jax.checkpoint
    def query_block(args):
        q_i, m_i = args
        init = (jnp.full((B, K, G, chunk), _NEG, jnp.float32),
                jnp.zeros((B, K, G, chunk), jnp.float32),
                jnp.zeros((B, K, G, chunk, Dh), jnp.float32))
        (_, l, acc), _ = jax.lax.scan(lambda c, xs: one_key_block(q_i, m_i, c, xs), init,
                                      (k_blocks, v_blocks, km_blocks))
        out = acc / l[..., None]  # every query row sees at least itself: l > 0
        return jnp.moveaxis(out, 3, 1).reshape(B, chunk, N, Dh).astype(q.dtype)

    # The whole map rematerialised as well: inside a differentiated layer scan, the inner
    # scan's per-key-block residuals of every query block were otherwise kept (quadratic
    # memory, measured); now only q, k, v and the metadata are.
    out = jax.checkpoint(lambda *a: jax.lax.map(query_block, a))(q_blocks, qm_blocks)
    return jnp.moveaxis(out, 0, 1).reshape(B, n * chunk, N, Dh)[:, :T]
