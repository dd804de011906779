"""Pure functions shared by the decoder: norms, activations, rotary embeddings, attention masks.

Kept free of nnx so the numerics (float32 norms / softmax / rotary) are easy to read and test.
"""

from __future__ import annotations

import math

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


def segment_causal_mask(segment_ids: jax.Array, window: int | None = None,
                        branch_ids: jax.Array | None = None,
                        positions: jax.Array | None = None) -> jax.Array:
    """[B, 1, L, L] bool: key j visible to query i iff j <= i and same segment id, and, with a
    sliding `window`, i - j < window (HF's `kv_idx > q_idx - sliding_window`).

    Packed segments are contiguous, so i - j is also the position difference within a segment.
    Padding (segment 0) rows see earlier padding incl. themselves, so no row is empty (no NaN).

    `branch_ids` [B, L] (prefix-shared rows, `dpo_jax.data.prefix`): 0 on a segment's shared
    prompt, k >= 1 on its k-th response branch; j must also be on the prompt or on i's branch
    (branch_j == 0 or branch_j == branch_i). A branch's columns then do not follow its prompt
    directly, so the window is measured in `positions` [B, L] (pos_i - pos_j < window), which
    equals i - j in rows without branches.
    """
    L = segment_ids.shape[1]
    delta = jnp.arange(L)[:, None] - jnp.arange(L)[None, :]
    causal = (delta >= 0)[None]
    if window is not None and branch_ids is None:
        causal = causal & (delta < window)[None]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    if branch_ids is not None:
        key_branch = branch_ids[:, None, :]
        same = same & ((key_branch == 0) | (key_branch == branch_ids[:, :, None]))
        if window is not None:
            if positions is None:
                raise ValueError("segment_causal_mask: a sliding window over branched rows "
                                 "needs positions (the window is measured in positions)")
            same = same & (positions[:, :, None] - positions[:, None, :] < window)
    return (causal & same)[:, None]


def attention_scale(cfg: ModelConfig) -> float:
    """Score scale: query_pre_attn_scalar**-0.5 (Gemma) or head_dim**-0.5."""
    base = cfg.query_pre_attn_scalar if cfg.query_pre_attn_scalar is not None else cfg.head_dim
    return float(base) ** -0.5


def attention(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array,
              mask: jax.Array) -> jax.Array:
    """q [B,T,N,Dh], k/v [B,S,K,Dh] (GQA when K < N), mask [B,1,T,S] -> [B,T,N,Dh].

    jax.nn.dot_product_attention keeps logits and softmax in float32 (XLA path) and can
    dispatch to cuDNN flash attention with attention_impl='cudnn'. attention_impl='chunked'
    runs the same over query blocks of cfg.attention_chunk rows (see chunked_attention).
    With cfg.attn_logit_softcap the scores go through softcapped_attention (jax's attention
    has no soft-capping). Sliding windows are part of `mask`.
    """
    scale, cap = attention_scale(cfg), cfg.attn_logit_softcap
    if cfg.attention_impl == "chunked":
        return chunked_attention(q, k, v, mask, cfg.attention_chunk, scale, cap)
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


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                      chunk: int, scale: float | None = None,
                      cap: float | None = None) -> jax.Array:
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
    """
    B, T, N, Dh = q.shape
    scale = float(Dh) ** -0.5 if scale is None else scale
    if T <= chunk:
        return _dense_attention(q, k, v, mask, scale, cap)
    S = k.shape[1]
    mask = jnp.broadcast_to(mask, (B, mask.shape[1], T, S))
    n = -(-T // chunk)
    pad = n * chunk - T
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad), (0, 0)), constant_values=True)
    q_blocks = jnp.moveaxis(q.reshape(B, n, chunk, N, Dh), 1, 0)  # [n, B, c, N, Dh]
    m_blocks = jnp.moveaxis(mask.reshape(B, mask.shape[1], n, chunk, S), 2, 0)  # [n,B,1,c,S]

    @jax.checkpoint
    def block(args):
        q_i, m_i = args
        return _dense_attention(q_i, k, v, m_i, scale, cap)

    out = jax.lax.map(block, (q_blocks, m_blocks))  # [n, B, c, N, Dh]
    return jnp.moveaxis(out, 0, 1).reshape(B, n * chunk, N, Dh)[:, :T]
