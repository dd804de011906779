"""The flax.nnx decoder: stacked layer parameters run by lax.scan (or an unrolled loop).

Every parameter is an `nnx.Param(value, axes=(...))`: the logical axis names are custom
Variable metadata (not flax's `sharding` metadata, which in flax 0.12 triggers eager sharding
and needs a mesh). Layer parameters carry a leading `layers` axis so one `lax.scan` runs all
layers and compile time does not grow with depth.

Parameter tree (pure dict keys):
  embed [V,D] ('vocab','embed'); pos_embed [max_len,D] (None,'embed') (learned positions only)
  layers/ln1/{scale,bias} [L,D]; layers/ln2/... (absent with shared_norm)
  layers/post_attn_norm/scale, layers/post_mlp_norm/scale [L,D] (post_norms)
  layers/attn/q [L,D,N,Dh]; k, v [L,D,K,Dh]; o [L,N,Dh,D]; q_bias [L,N,Dh] ... o_bias [L,D]
  layers/attn/q_norm/scale, k_norm/scale [L,Dh] (qk_norm)
  layers/mlp/up [L,D,F]; gate [L,D,F] (gated); down [L,F,D]; up_bias, gate_bias, down_bias
  final_norm/{scale,bias}; lm_head [V,D] (untied only); lm_head_bias [V] (GPT-J)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax.models import layers as F
from dpo_jax.models.config import ModelConfig

Cache = dict[str, Any]


def _param(rngs: nnx.Rngs, shape: tuple, axes: tuple, cfg: ModelConfig,
           init: str = "normal") -> nnx.Param:
    """A parameter in cfg.param_dtype with logical axis names as custom `axes` metadata."""
    dtype = jnp.dtype(cfg.param_dtype)
    if init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = (cfg.init_std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    assert len(axes) == len(shape), (shape, axes)
    return nnx.Param(value, axes=axes)



def _mm(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., I] @ w [I, O] as one matmul on [rows, I].

    Same numbers as the batched form; XLA:CPU runs a dot with several leading dims, and above
    all its weight gradient (a contraction over two batch-like dims), several times slower
    than the flattened matmul (measured: a 4-layer MLP's gradient 0.78 s vs 0.24 s).
    """
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


def _heads(x: jax.Array, w_DNH: jax.Array) -> jax.Array:
    """x [..., D] @ w [D, N, H] -> [..., N, H] through one 2-D matmul."""
    y = _mm(x, w_DNH.reshape(w_DNH.shape[0], -1))
    return y.reshape(*x.shape[:-1], *w_DNH.shape[1:])

class Norm(nnx.Module):
    """cfg.norm over the last axis of size `dim` (None: d_model). Scale initialised to the
    identity: ones, or zeros with norm_unit_offset (scale = 1 + w)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lead: tuple = (), lead_axes: tuple = (),
                 dim: int | None = None):
        self.cfg = cfg
        shape = lead + (dim or cfg.d_model,)
        self.scale = _param(rngs, shape, lead_axes + (None,), cfg,
                            "zeros" if cfg.norm_unit_offset else "ones")
        if cfg.norm == "layernorm":
            self.bias = _param(rngs, shape, lead_axes + (None,), cfg, "zeros")

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = self.bias[...] if self.cfg.norm == "layernorm" else None
        return F.norm(self.cfg, x, self.scale[...], bias)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lead: tuple, lead_axes: tuple):
        self.cfg = cfg
        D, N, K, Dh = cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        p = lambda shape, axes, init="normal": _param(rngs, lead + shape, lead_axes + axes, cfg,
                                                      init)
        self.q = p((D, N, Dh), ("embed", "heads", "head_dim"))
        self.k = p((D, K, Dh), ("embed", "kv_heads", "head_dim"))
        self.v = p((D, K, Dh), ("embed", "kv_heads", "head_dim"))
        self.o = p((N, Dh, D), ("heads", "head_dim", "embed"))
        if cfg.qkv_bias:
            self.q_bias = p((N, Dh), ("heads", "head_dim"), "zeros")
            self.k_bias = p((K, Dh), ("kv_heads", "head_dim"), "zeros")
            self.v_bias = p((K, Dh), ("kv_heads", "head_dim"), "zeros")
        if cfg.attn_out_bias:
            self.o_bias = p((D,), (None,), "zeros")
        if cfg.qk_norm:
            self.q_norm = Norm(cfg, rngs, lead, lead_axes, dim=Dh)
            self.k_norm = Norm(cfg, rngs, lead, lead_axes, dim=Dh)

    def qkv(self, x: jax.Array, sin: jax.Array | None, cos: jax.Array | None):
        cfg, dt = self.cfg, x.dtype
        q = _heads(x, self.q[...].astype(dt))
        k = _heads(x, self.k[...].astype(dt))
        v = _heads(x, self.v[...].astype(dt))
        if cfg.qkv_bias:
            q = q + self.q_bias[...].astype(dt)
            k = k + self.k_bias[...].astype(dt)
            v = v + self.v_bias[...].astype(dt)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.position == "rotary":
            q = F.apply_rotary(cfg, q, sin, cos)
            k = F.apply_rotary(cfg, k, sin, cos)
        return q, k, v

    def out(self, a: jax.Array) -> jax.Array:
        o = self.o[...].astype(a.dtype)
        y = _mm(a.reshape(*a.shape[:-2], -1), o.reshape(-1, o.shape[-1]))
        if self.cfg.attn_out_bias:
            y = y + self.o_bias[...].astype(a.dtype)
        return y


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lead: tuple, lead_axes: tuple):
        self.cfg = cfg
        D, Fd = cfg.d_model, cfg.d_ff
        p = lambda shape, axes, init="normal": _param(rngs, lead + shape, lead_axes + axes, cfg,
                                                      init)
        self.up = p((D, Fd), ("embed", "mlp"))
        if cfg.gated_mlp:
            self.gate = p((D, Fd), ("embed", "mlp"))
        self.down = p((Fd, D), ("mlp", "embed"))
        if cfg.mlp_bias:
            self.up_bias = p((Fd,), ("mlp",), "zeros")
            if cfg.gated_mlp:
                self.gate_bias = p((Fd,), ("mlp",), "zeros")
            self.down_bias = p((D,), (None,), "zeros")

    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dt = self.cfg, x.dtype
        u = _mm(x, self.up[...].astype(dt))
        if cfg.mlp_bias:
            u = u + self.up_bias[...].astype(dt)
        if cfg.gated_mlp:
            g = _mm(x, self.gate[...].astype(dt))
            if cfg.mlp_bias:
                g = g + self.gate_bias[...].astype(dt)
            u = F.activation(cfg.activation, g) * u
        else:
            u = F.activation(cfg.activation, u)
        y = _mm(u, self.down[...].astype(dt))
        if cfg.mlp_bias:
            y = y + self.down_bias[...].astype(dt)
        return y


class Block(nnx.Module):
    """One transformer layer; constructed with a leading `layers` axis on every parameter and
    called on one layer's slice (inside scan or the unrolled loop)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lead: tuple = (), lead_axes: tuple = ()):
        self.cfg = cfg
        self.ln1 = Norm(cfg, rngs, lead, lead_axes)
        if not cfg.shared_norm:
            self.ln2 = Norm(cfg, rngs, lead, lead_axes)
        self.attn = Attention(cfg, rngs, lead, lead_axes)
        self.mlp = MLP(cfg, rngs, lead, lead_axes)
        if cfg.post_norms:
            self.post_attn_norm = Norm(cfg, rngs, lead, lead_axes)
            self.post_mlp_norm = Norm(cfg, rngs, lead, lead_axes)

    def __call__(self, h: jax.Array, sin, cos, mask: jax.Array,
                 kv: tuple | None = None):
        """kv=None: self-attention over h. kv=(k_cache, v_cache, slot_BT): write this call's
        keys/values into the cache at per-row slots, attend over the whole cache."""
        cfg = self.cfg
        x = self.ln1(h)
        q, k, v = self.attn.qkv(x, sin, cos)
        new_kv = None
        if kv is not None:
            k_cache, v_cache, start_B = kv
            write = jax.vmap(lambda c, u, s: jax.lax.dynamic_update_slice_in_dim(c, u, s, 0))
            k_cache = write(k_cache, k.astype(k_cache.dtype), start_B)
            v_cache = write(v_cache, v.astype(v_cache.dtype), start_B)
            new_kv = (k_cache, v_cache)
            k, v = k_cache.astype(q.dtype), v_cache.astype(q.dtype)
        a = self.attn.out(F.attention(cfg, q, k, v, mask))
        if cfg.parallel_residual:
            m = self.mlp(x if cfg.shared_norm else self.ln2(h))
            h = h + a + m
        elif cfg.post_norms:
            h = h + self.post_attn_norm(a)
            h = h + self.post_mlp_norm(self.mlp(self.ln2(h)))
        else:
            h = h + a
            h = h + self.mlp(self.ln2(h))
        return h, new_kv


_REMAT_POLICIES = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    # keeps the projections' outputs (2-D matmuls here, see _mm) and recomputes attention's
    # batched score/value contractions and softmax: the [heads, T, T] probabilities of the
    # XLA attention path are not stored
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Decoder(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        V, D = cfg.vocab_size, cfg.d_model
        self.embed = _param(rngs, (V, D), ("vocab", "embed"), cfg)
        if cfg.position == "learned":
            self.pos_embed = _param(rngs, (cfg.max_len, D), (None, "embed"), cfg)
        self.layers = Block(cfg, rngs, (cfg.n_layer,), ("layers",))
        self.final_norm = Norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (V, D), ("vocab", "embed"), cfg)
        if cfg.lm_head_bias:
            self.lm_head_bias = _param(rngs, (V,), ("vocab",), cfg, "zeros")

    def unembedding(self) -> tuple[jax.Array, jax.Array | None]:
        w = self.embed[...] if self.cfg.tie_embeddings else self.lm_head[...]
        b = self.lm_head_bias[...] if self.cfg.lm_head_bias else None
        return w, b

    def _embed(self, ids: jax.Array, positions: jax.Array):
        """Embedded tokens [B,T,D] and the rotary tables {layer type: (sin, cos) or (None,
        None)} of the layer types present (see _layer_kinds)."""
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        h = jnp.take(self.embed[...], ids, axis=0).astype(dt)
        if cfg.embed_scale:  # Gemma: sqrt(d_model), as a scalar of the compute dtype
            h = h * jnp.asarray(cfg.d_model ** 0.5, dt)
        ropes = {}
        if cfg.position == "learned":
            h = h + jnp.take(self.pos_embed[...], positions, axis=0).astype(dt)
        for kind in _layer_kinds(cfg):
            ropes[kind] = ((None, None) if cfg.position == "learned" else
                           F.rotary_tables(cfg, positions, local=kind == "sliding"))
        return h, ropes

    def _run_layers(self, h, ropes, masks, cache_kv=None, start_B=None):
        """Run every layer. ropes / masks: {layer type: (sin, cos) / mask} for the types in
        _layer_kinds; with both types present each layer picks its own by a per-layer flag
        scanned alongside its parameters."""
        cfg = self.cfg
        graphdef, state = nnx.split(self.layers)
        kinds = _layer_kinds(cfg)

        def body(h, xs):
            layer_state, kv, sliding = xs
            if len(kinds) == 1:
                (sin, cos), mask = ropes[kinds[0]], masks[kinds[0]]
            else:
                pick = lambda a, b: None if a is None else jnp.where(sliding, a, b)
                mask = pick(masks["sliding"], masks["full"])
                sin, cos = (pick(a, b) for a, b in zip(ropes["sliding"], ropes["full"]))
            block = nnx.merge(graphdef, layer_state)
            kv_arg = None if kv is None else (kv[0], kv[1], start_B)
            h, new_kv = block(h, sin, cos, mask, kv_arg)
            return h, new_kv

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        xs = (state, cache_kv, jnp.asarray(cfg.sliding_layers))
        if cfg.scan_layers:
            return jax.lax.scan(body, h, xs)
        outs = []
        for i in range(cfg.n_layer):
            h, new_kv = body(h, jax.tree.map(lambda a: a[i], xs))
            outs.append(new_kv)
        stacked = None if cache_kv is None else jax.tree.map(lambda *a: jnp.stack(a), *outs)
        return h, stacked

    def __call__(self, ids: jax.Array, positions: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """Hidden states [B, L, D] after the final norm, in the compute dtype."""
        h, ropes = self._embed(ids, positions)
        masks = {kind: F.segment_causal_mask(
            segment_ids, self.cfg.sliding_window if kind == "sliding" else None)
            for kind in _layer_kinds(self.cfg)}
        h, _ = self._run_layers(h, ropes, masks)
        return self.final_norm(h)

    def decode(self, ids: jax.Array, positions: jax.Array, cache: Cache,
               segment_ids: jax.Array | None = None) -> tuple[jax.Array, Cache]:
        """Process T new tokens per row against a KV cache (prefill: T = prompt length;
        sampling: T = 1).

        Row b writes its tokens at cache slots index[b] .. index[b]+T-1. Query t of row b sees
        slot s iff s <= index[b]+t and slot s holds a real token (cache['valid']), or s is its
        own slot (so padded query rows never see an empty row). index[b] then advances by the
        number of real tokens (segment_ids != 0), so right-padding of a prefill is overwritten
        by the next step: prompts of different lengths share one batch. A row's real tokens
        therefore sit in consecutive slots, and sliding layers also require slot s >
        own slot - sliding_window (the window over positions, as in the full forward).
        """
        B, T = ids.shape
        if segment_ids is None:
            segment_ids = jnp.ones((B, T), jnp.int32)
        real = segment_ids != 0
        start = cache["index"]
        S = cache["valid"].shape[1]
        slots = start[:, None] + jnp.arange(T)[None, :]  # [B, T]
        write = jax.vmap(lambda c, u, s: jax.lax.dynamic_update_slice_in_dim(c, u, s, 0))
        valid = write(cache["valid"], real, start)
        delta = slots[:, :, None] - jnp.arange(S)[None, None, :]  # query slot - key slot
        masks = {}
        for kind in _layer_kinds(self.cfg):
            seen = valid[:, None, :] & (delta >= 0)
            if kind == "sliding":
                seen = seen & (delta < self.cfg.sliding_window)
            masks[kind] = (seen | (delta == 0))[:, None]
        h, ropes = self._embed(ids, positions)
        h, (k, v) = self._run_layers(h, ropes, masks, (cache["k"], cache["v"]), start)
        new_cache = {"k": k, "v": v, "valid": valid,
                     "index": start + jnp.sum(real, axis=1).astype(start.dtype)}
        return self.final_norm(h), new_cache


def _layer_kinds(cfg: ModelConfig) -> tuple[str, ...]:
    """The layer types present, in a fixed order ('full' before 'sliding')."""
    present = set(cfg.sliding_layers)
    return tuple(kind for flag, kind in ((False, "full"), (True, "sliding")) if flag in present)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: Any = None) -> Cache:
    """Empty KV cache: k, v [n_layer, B, max_len, n_kv_head, head_dim], per-row write index,
    per-slot validity. max_len must cover prompt + generated tokens (writes past it clamp)."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (cfg.n_layer, batch, max_len, cfg.n_kv_head, cfg.head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "index": jnp.zeros((batch,), jnp.int32),
            "valid": jnp.zeros((batch, max_len), bool)}
