"""Pure functions shared by the decoder: norms, activations, rotary embeddings, attention masks.

Kept free of nnx so the numerics (float32 norms / softmax / rotary) are easy to read and test.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dpo_jax.models.config import ModelConfig


def norm(cfg: ModelConfig, x: jax.Array, scale: jax.Array, bias: jax.Array | None) -> jax.Array:
    """LayerNorm or RMSNorm computed in float32 (bf16 statistics are too noisy), cast back."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if cfg.norm == "layernorm":
        mean = jnp.mean(x, axis=-1, keepdims=True)
        x = x - mean
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    y = x * jax.lax.rsqrt(var + cfg.norm_eps) * scale.astype(jnp.float32)
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


def inv_frequencies(cfg: ModelConfig) -> jax.Array:
    """Rotary inverse frequencies [rotary_dim/2] with HF's rope scaling rules (linear, llama3)."""
    rd = cfg.rotary_dim
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
    return inv


def rotary_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sin, cos [B, T, rotary_dim/2] in float32 for integer positions [B, T]."""
    ang = positions.astype(jnp.float32)[..., None] * inv_frequencies(cfg)
    return jnp.sin(ang), jnp.cos(ang)


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


def segment_causal_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, 1, L, L] bool: key j visible to query i iff j <= i and same segment id.

    Padding (segment 0) rows see earlier padding incl. themselves, so no row is empty (no NaN).
    """
    L = segment_ids.shape[1]
    causal = jnp.arange(L)[:, None] >= jnp.arange(L)[None, :]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal[None] & same)[:, None]


def attention(cfg: ModelConfig, q: jax.Array, k: jax.Array, v: jax.Array,
              mask: jax.Array) -> jax.Array:
    """q [B,T,N,Dh], k/v [B,S,K,Dh] (GQA when K < N), mask [B,1,T,S] -> [B,T,N,Dh].

    jax.nn.dot_product_attention keeps logits and softmax in float32 (XLA path) and can
    dispatch to cuDNN flash attention with attention_impl='cudnn'.
    """
    impl = None if cfg.attention_impl in (None, "xla") else cfg.attention_impl
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
