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
  layers/mlp/router, gate, up, down, shared/... with n_experts > 0 (see moe.py)
  final_norm/{scale,bias}; lm_head [V,D] (untied only); lm_head_bias [V] (GPT-J)

Shape suffixes of arrays: L layers, B batch, T tokens of this call, S key positions (T, or cache
slots), D d_model, N query heads, K kv heads, H head_dim (Dh above), F d_ff, R rotary_dim / 2.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax.models import context_parallel
from dpo_jax.models import moe
from dpo_jax.models import quant
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.layers import (
    activation,
    apply_rotary,
    MetaMask,
    attention,
    branch_tree,
    norm,
    rotary_tables,
    token_meta,
)

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
    all its weight gradient (a contraction over two batch-like dims), more slowly than the
    flattened matmul.
    """
    if x.ndim > 2 and context_parallel.context_mesh() is not None:
        # the sequence is split over devices: [B, T] cannot merge into one sharded row axis
        # (each device holds a T-block of every row), so flattening would gather the tokens
        return jnp.einsum("...i,io->...o", x, w)
    return (x.reshape(-1, x.shape[-1]) @ w).reshape(*x.shape[:-1], w.shape[-1])


def _dense(module: nnx.Module, name: str, x: jax.Array) -> jax.Array:
    """``x`` [..., I] times ``module``'s projection ``name`` read as [I, O] -> [..., O], in
    ``x``'s dtype: a parameter, or a quantised weight (``quant.QuantLinear``, a LoRA run's
    quantised base) dequantised inside the matmul."""
    w = getattr(module, name)
    # under a mesh the tokens keep the batch's layout through the matmul (rows over data x
    # fsdp, the sequence over context), so the compiler gathers the weights (FSDP) rather
    # than the activations
    x = context_parallel.constrain_sequence(x)
    if isinstance(w, quant.QuantLinear):
        return context_parallel.constrain_sequence(w(x))
    return context_parallel.constrain_sequence(
        _mm(x, w[...].astype(x.dtype).reshape(x.shape[-1], -1)))


def _adapted(module: nnx.Module, name: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """``y``, projection ``name`` of ``x`` [..., I] (input axes flattened), plus its low-rank
    update when ``module`` carries a LoRA adapter for it (attribute ``lora_<name>``, attached
    by dpo_jax/lora.py: ``scale * dropout(x) @ A @ B``); ``y`` itself otherwise."""
    adapter = getattr(module, "lora_" + name, None)
    return y if adapter is None else y + adapter(x).reshape(y.shape).astype(y.dtype)


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
        return norm(self.cfg, x, self.scale[...], bias)


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

    def qkv(self, x_BTD: jax.Array, sin_BTR: jax.Array | None, cos_BTR: jax.Array | None):
        """Queries [B,T,N,H], keys and values [B,T,K,H] (biased, normed, rotated per cfg)."""
        cfg, dt = self.cfg, x_BTD.dtype
        heads = lambda name, n: _adapted(self, name, x_BTD, _dense(self, name, x_BTD).reshape(
            *x_BTD.shape[:-1], n, cfg.head_dim))
        q_BTNH, k_BTKH, v_BTKH = heads("q", cfg.n_head), heads("k", cfg.n_kv_head), heads(
            "v", cfg.n_kv_head)
        if cfg.qkv_bias:
            q_BTNH = q_BTNH + self.q_bias[...].astype(dt)
            k_BTKH = k_BTKH + self.k_bias[...].astype(dt)
            v_BTKH = v_BTKH + self.v_bias[...].astype(dt)
        if cfg.qk_norm:
            q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
        if cfg.position == "rotary":
            q_BTNH = apply_rotary(cfg, q_BTNH, sin_BTR, cos_BTR)
            k_BTKH = apply_rotary(cfg, k_BTKH, sin_BTR, cos_BTR)
        return q_BTNH, k_BTKH, v_BTKH

    def out(self, a_BTNH: jax.Array) -> jax.Array:
        """The output projection of attention's result: [B,T,N,H] -> [B,T,D]."""
        a_BTF = a_BTNH.reshape(*a_BTNH.shape[:-2], -1)
        y_BTD = _adapted(self, "o", a_BTF, _dense(self, "o", a_BTF))
        if self.cfg.attn_out_bias:
            y_BTD = y_BTD + self.o_bias[...].astype(a_BTNH.dtype)
        return y_BTD


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lead: tuple, lead_axes: tuple):
        self.cfg = cfg
        D, F = cfg.d_model, cfg.d_ff
        p = lambda shape, axes, init="normal": _param(rngs, lead + shape, lead_axes + axes, cfg,
                                                      init)
        self.up = p((D, F), ("embed", "mlp"))
        if cfg.gated_mlp:
            self.gate = p((D, F), ("embed", "mlp"))
        self.down = p((F, D), ("mlp", "embed"))
        if cfg.mlp_bias:
            self.up_bias = p((F,), ("mlp",), "zeros")
            if cfg.gated_mlp:
                self.gate_bias = p((F,), ("mlp",), "zeros")
            self.down_bias = p((D,), (None,), "zeros")

    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        """[B,T,D] -> [B,T,D]: down(act(gate(x)) * up(x)) when gated, else down(act(up(x)))."""
        cfg, dt = self.cfg, x_BTD.dtype
        u_BTF = _adapted(self, "up", x_BTD, _dense(self, "up", x_BTD))
        if cfg.mlp_bias:
            u_BTF = u_BTF + self.up_bias[...].astype(dt)
        if cfg.gated_mlp:
            g_BTF = _adapted(self, "gate", x_BTD, _dense(self, "gate", x_BTD))
            if cfg.mlp_bias:
                g_BTF = g_BTF + self.gate_bias[...].astype(dt)
            u_BTF = activation(cfg.activation, g_BTF) * u_BTF
        else:
            u_BTF = activation(cfg.activation, u_BTF)
        y_BTD = _adapted(self, "down", u_BTF, _dense(self, "down", u_BTF))
        if cfg.mlp_bias:
            y_BTD = y_BTD + self.down_bias[...].astype(dt)
        return y_BTD


class Block(nnx.Module):
    """One transformer layer; constructed with a leading `layers` axis on every parameter and
    called on one layer's slice (inside scan or the unrolled loop)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, lead: tuple = (), lead_axes: tuple = ()):
        self.cfg = cfg
        self.ln1 = Norm(cfg, rngs, lead, lead_axes)
        if not cfg.shared_norm:
            self.ln2 = Norm(cfg, rngs, lead, lead_axes)
        self.attn = Attention(cfg, rngs, lead, lead_axes)
        if cfg.n_experts:  # mixture of experts in place of the MLP (Mixtral, Qwen2-MoE)
            self.mlp = moe.MoE(cfg, lambda shape, axes, init="normal": _param(
                rngs, lead + shape, lead_axes + axes, cfg, init))
        else:
            self.mlp = MLP(cfg, rngs, lead, lead_axes)
        if cfg.post_norms:
            self.post_attn_norm = Norm(cfg, rngs, lead, lead_axes)
            self.post_mlp_norm = Norm(cfg, rngs, lead, lead_axes)

    def __call__(self, h_BTD: jax.Array, sin_BTR, cos_BTR, mask_B1TS: jax.Array,
                 kv: tuple | None = None):
        """Residual stream [B,T,D] through one layer -> (new [B,T,D], new (k, v) cache or None,
        the router statistics of a mixture-of-experts layer (moe.RouterStats) or None).

        kv=None: self-attention over h_BTD (S = T). kv=(k_cache_BSKH, v_cache_BSKH, start_B):
        write this call's keys/values into the cache from per-row slot start_B, attend over the
        whole cache."""
        cfg = self.cfg
        x_BTD = self.ln1(h_BTD)
        q_BTNH, k_BSKH, v_BSKH = self.attn.qkv(x_BTD, sin_BTR, cos_BTR)
        new_kv = None
        if kv is not None:
            k_cache_BSKH, v_cache_BSKH, start_B = kv
            write = jax.vmap(lambda c, u, s: jax.lax.dynamic_update_slice_in_dim(c, u, s, 0))
            k_cache_BSKH = write(k_cache_BSKH, k_BSKH.astype(k_cache_BSKH.dtype), start_B)
            v_cache_BSKH = write(v_cache_BSKH, v_BSKH.astype(v_cache_BSKH.dtype), start_B)
            new_kv = (k_cache_BSKH, v_cache_BSKH)
            k_BSKH = k_cache_BSKH.astype(q_BTNH.dtype)
            v_BSKH = v_cache_BSKH.astype(q_BTNH.dtype)
        if kv is None and context_parallel.context_mesh() is not None:  # sequence split
            a_BTNH = context_parallel.attention(cfg, q_BTNH, k_BSKH, v_BSKH, mask_B1TS)
        else:
            a_BTNH = attention(cfg, q_BTNH, k_BSKH, v_BSKH, mask_B1TS)
        a_BTD = self.attn.out(a_BTNH)
        mlp = self.mlp if cfg.n_experts else lambda x: (self.mlp(x), None)
        if cfg.parallel_residual:
            m_BTD, router = mlp(x_BTD if cfg.shared_norm else self.ln2(h_BTD))
            h_BTD = h_BTD + a_BTD + m_BTD
        elif cfg.post_norms:
            h_BTD = h_BTD + self.post_attn_norm(a_BTD)
            m_BTD, router = mlp(self.ln2(h_BTD))
            h_BTD = h_BTD + self.post_mlp_norm(m_BTD)
        else:
            h_BTD = h_BTD + a_BTD
            m_BTD, router = mlp(self.ln2(h_BTD))
            h_BTD = h_BTD + m_BTD
        return h_BTD, new_kv, router


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

    def _embed(self, ids_BT: jax.Array, positions_BT: jax.Array):
        """Embedded tokens [B,T,D] and the rotary tables {layer type: (sin [B,T,R], cos
        [B,T,R]) or (None, None)} of the layer types present (see _layer_kinds)."""
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        h_BTD = (self.embed.lookup(ids_BT) if isinstance(self.embed, quant.QuantEmbedding)
                 else jnp.take(self.embed[...], ids_BT, axis=0)).astype(dt)
        if cfg.embed_scale:  # Gemma: sqrt(d_model), as a scalar of the compute dtype
            h_BTD = h_BTD * jnp.asarray(cfg.d_model ** 0.5, dt)
        ropes = {}
        if cfg.position == "learned":
            h_BTD = h_BTD + jnp.take(self.pos_embed[...], positions_BT, axis=0).astype(dt)
        for kind in _layer_kinds(cfg):
            ropes[kind] = ((None, None) if cfg.position == "learned" else
                           rotary_tables(cfg, positions_BT, local=kind == "sliding"))
        return h_BTD, ropes

    def _run_layers(self, h_BTD, ropes, masks, cache_kv=None, start_B=None):
        """Run every layer. ropes / masks: {layer type: (sin, cos) / mask [B,1,T,S] or
        layers.MetaMask (the same metadata for every type, its window per type; under context
        parallelism each device holds its tokens' part)} for the
        types in _layer_kinds; with both types present each layer picks its own by a per-layer
        flag scanned alongside its parameters. cache_kv: (k, v) [n_layer,B,S,K,H] or None.
        Returns (h [B,T,D], the updated (k, v) cache or None, the stacked router statistics
        [n_layer, ...] of mixture-of-experts layers or None)."""
        cfg = self.cfg
        graphdef, state = nnx.split(self.layers)
        kinds = _layer_kinds(cfg)

        def body(h_BTD, xs):
            layer_state, kv, sliding = xs
            if len(kinds) == 1:
                (sin_BTR, cos_BTR), mask_B1TS = ropes[kinds[0]], masks[kinds[0]]
            else:
                pick = lambda a, b: None if a is None else jnp.where(sliding, a, b)
                if isinstance(masks["sliding"], MetaMask):  # one metadata, a per-layer window
                    mask_B1TS = MetaMask(masks["sliding"].meta, jnp.where(
                        sliding, masks["sliding"].window, _NO_WINDOW))
                else:
                    mask_B1TS = pick(masks["sliding"], masks["full"])
                sin_BTR, cos_BTR = (pick(a, b) for a, b in zip(ropes["sliding"], ropes["full"]))
            block = nnx.merge(graphdef, layer_state)
            kv_arg = None if kv is None else (kv[0], kv[1], start_B)
            h_BTD, new_kv, router = block(h_BTD, sin_BTR, cos_BTR, mask_B1TS, kv_arg)
            if kv is None:  # between layers the residual keeps the batch's layout
                h_BTD = context_parallel.constrain_sequence(h_BTD)
            return h_BTD, (new_kv, router)

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        xs = (state, cache_kv, jnp.asarray(cfg.sliding_layers))
        if cfg.scan_layers:
            h_BTD, (new_kv, router) = jax.lax.scan(body, h_BTD, xs)
            return h_BTD, new_kv, router
        outs = []
        for i in range(cfg.n_layer):
            h_BTD, out = body(h_BTD, jax.tree.map(lambda a: a[i], xs))
            outs.append(out)
        new_kv, router = jax.tree.map(lambda *a: jnp.stack(a), *outs)
        return h_BTD, new_kv, router

    def __call__(self, ids_BT: jax.Array, positions_BT: jax.Array,
                 segment_ids_BT: jax.Array, branch_ids_BT: jax.Array | None = None,
                 router_aux: bool = False, routing: bool = False,
                 tree_BT: tuple[jax.Array, jax.Array] | None = None):
        """Hidden states [B, T, D] after the final norm, in the compute dtype. tree_BT:
        preference-tree rows' ``(tree_lo, tree_hi)`` [B, T] DFS intervals (layers.TokenMeta),
        or None; branch_ids_BT: prefix-shared rows' branch per token, read as a tree with one
        branch point (layers.branch_tree), or None. The attention mask is built from this
        per-token metadata (layers.block_mask), per query block with attention_impl='chunked'.
        router_aux=True (mixture-of-experts configs only): (hidden, the router's load-balancing
        loss over the real tokens, moe.load_balancing_loss). routing=True (mixture-of-experts
        only): (hidden, that loss or None, each layer's sorted top-k expert ids [L, B, T, K]
        int32, moe.routing_agreement)."""
        h_BTD, ropes = self._embed(ids_BT, positions_BT)
        if branch_ids_BT is not None:
            if tree_BT is not None:
                raise ValueError("pass tree_BT or branch_ids_BT, not both")
            tree_BT = branch_tree(branch_ids_BT)
        meta = token_meta(segment_ids_BT, positions_BT, tree_BT)
        # under a mesh: rows over data x fsdp and, with context parallelism, the tokens (and
        # their metadata) split along the sequence, each device building its own mask blocks
        h_BTD = context_parallel.constrain_sequence(h_BTD)
        masks = {kind: MetaMask(meta, self.cfg.sliding_window if kind == "sliding" else None)
                 for kind in _layer_kinds(self.cfg)}
        h_BTD, _, router = self._run_layers(h_BTD, ropes, masks)
        if (router_aux or routing) and router is None:
            raise ValueError("router_aux=True (e.g. loss.router_aux_loss_coef > 0) and routing="
                             "True need a mixture-of-experts model (n_experts > 0)")
        aux = moe.load_balancing_loss(router, segment_ids_BT != 0) if router_aux else None
        if routing:
            return self.final_norm(h_BTD), aux, router[2]
        return (self.final_norm(h_BTD), aux) if router_aux else self.final_norm(h_BTD)

    def decode(self, ids_BT: jax.Array, positions_BT: jax.Array, cache: Cache,
               segment_ids_BT: jax.Array | None = None) -> tuple[jax.Array, Cache]:
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
        B, T = ids_BT.shape
        if segment_ids_BT is None:
            segment_ids_BT = jnp.ones((B, T), jnp.int32)
        real_BT = segment_ids_BT != 0
        start_B = cache["index"]
        S = cache["valid"].shape[1]
        slots_BT = start_B[:, None] + jnp.arange(T)[None, :]
        write = jax.vmap(lambda c, u, s: jax.lax.dynamic_update_slice_in_dim(c, u, s, 0))
        valid_BS = write(cache["valid"], real_BT, start_B)
        delta_BTS = slots_BT[:, :, None] - jnp.arange(S)[None, None, :]  # query slot - key slot
        masks = {}
        for kind in _layer_kinds(self.cfg):
            seen_BTS = valid_BS[:, None, :] & (delta_BTS >= 0)
            if kind == "sliding":
                seen_BTS = seen_BTS & (delta_BTS < self.cfg.sliding_window)
            masks[kind] = (seen_BTS | (delta_BTS == 0))[:, None]
        h_BTD, ropes = self._embed(ids_BT, positions_BT)
        h_BTD, (k_LBSKH, v_LBSKH), _ = self._run_layers(h_BTD, ropes, masks,
                                                        (cache["k"], cache["v"]), start_B)
        new_cache = {"k": k_LBSKH, "v": v_LBSKH, "valid": valid_BS,
                     "index": start_B + jnp.sum(real_BT, axis=1).astype(start_B.dtype)}
        return self.final_norm(h_BTD), new_cache


# The window of full-attention layers when a per-layer window is picked inside the layer scan:
# larger than any position difference.
_NO_WINDOW = 2 ** 30


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
