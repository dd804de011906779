"""Autoregressive sampling with the KV cache (minimal version for PPO rollouts).

NOTE: another branch owns the full ``dpo_jax/sampling.py``; this file implements the same
public signature (``SamplingConfig``, ``Samples``, ``generate``) so the PPO task can be built
and tested before that lands. At merge the other branch's file replaces this one.

Layout: ``tokens_BT`` holds each row's prompt followed directly by its completion, right-padded
with ``pad_id``; ``T = P + max_new_tokens``. A row stops after its first EOS (EOS is part of the
completion and of ``completion_mask``).
"""

from __future__ import annotations

import dataclasses

import flax
import jax
import jax.numpy as jnp

from dpo_jax.models.model import project


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    eos_id: int = 0
    pad_id: int = 0


@flax.struct.dataclass
class Samples:
    tokens_BT: jax.Array  # int32 [B, P + N]
    completion_mask_BT: jax.Array  # f32 [B, P + N]: 1 at generated tokens (incl. EOS)
    logps_BT: jax.Array  # f32 [B, P + N]: untempered log p of each generated token, 0 elsewhere
    lengths_B: jax.Array  # int32 [B]: generated tokens per row (incl. EOS)


def _filter_logits(logits_BV: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Tempered, top-k / top-p filtered logits (the sampling distribution, not the scored one)."""
    x = logits_BV / max(cfg.temperature, 1e-6)
    if cfg.top_k and cfg.top_k < x.shape[-1]:
        kth = jax.lax.top_k(x, cfg.top_k)[0][:, -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if cfg.top_p < 1.0:
        sorted_x = jnp.sort(x, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_x, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted token
        cutoff = jnp.min(jnp.where(before < cfg.top_p, sorted_x, jnp.inf), axis=-1, keepdims=True)
        x = jnp.where(x < cutoff, -jnp.inf, x)
    return x


def _pick(logits_BV: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """Next token per row and its untempered log-prob."""
    if cfg.temperature == 0:
        tok = jnp.argmax(logits_BV, axis=-1)
    else:
        tok = jax.random.categorical(rng, _filter_logits(logits_BV, cfg), axis=-1)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits_BV, -1), tok[:, None], -1)[:, 0]
    return tok.astype(jnp.int32), logp


def generate(model, params, prompt_ids_BP: jax.Array, prompt_lengths_B: jax.Array,
             rng: jax.Array, cfg: SamplingConfig) -> Samples:
    """Sample ``cfg.max_new_tokens`` tokens after each right-padded prompt; jittable."""
    B, P = prompt_ids_BP.shape
    N = cfg.max_new_tokens
    T = P + N
    lengths = prompt_lengths_B.astype(jnp.int32)
    w, b = model.unembedding(params)
    cache = model.init_cache(B, T)
    seg = (jnp.arange(P)[None, :] < lengths[:, None]).astype(jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    h, cache = model.decode(params, prompt_ids_BP, pos, cache, seg)
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
    logits = project(last, w, b)

    def body(carry, rng_i):
        cache, logits, done, i = carry
        tok, logp = _pick(logits, rng_i, cfg)
        live = ~done
        tok = jnp.where(live, tok, cfg.pad_id)
        h, cache = model.decode(params, tok[:, None], (lengths + i)[:, None], cache,
                                live.astype(jnp.int32)[:, None])
        new_logits = project(h[:, 0], w, b)
        done = done | (live & (tok == cfg.eos_id))
        return (cache, new_logits, done, i + 1), (tok, jnp.where(live, logp, 0.0), live)

    init = (cache, logits, jnp.zeros((B,), bool), jnp.int32(0))
    _, (tok_NB, logp_NB, live_NB) = jax.lax.scan(body, init, jax.random.split(rng, N))
    tok_BN, logp_BN, live_BN = tok_NB.T, logp_NB.T, live_NB.T.astype(jnp.float32)
    # Scatter the completion right after each row's prompt.
    cols = lengths[:, None] + jnp.arange(N)[None, :]  # [B, N]
    rows = jnp.arange(B)[:, None]
    prompt_part = jnp.where(jnp.arange(P)[None, :] < lengths[:, None], prompt_ids_BP, cfg.pad_id)
    tokens = jnp.full((B, T), cfg.pad_id, jnp.int32).at[:, :P].set(prompt_part)
    tokens = tokens.at[rows, cols].set(jnp.where(live_BN > 0, tok_BN, cfg.pad_id))
    mask = jnp.zeros((B, T), jnp.float32).at[rows, cols].set(live_BN)
    logps = jnp.zeros((B, T), jnp.float32).at[rows, cols].set(logp_BN)
    return Samples(tokens_BT=tokens, completion_mask_BT=mask, logps_BT=logps,
                   lengths_B=live_BN.sum(axis=1).astype(jnp.int32))
