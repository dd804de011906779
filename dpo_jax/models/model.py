"""`Model`: the functional face of the nnx decoder. Parameters are plain nested dicts of arrays.

Why: optax, orbax, sharding rules and the loss code should not depend on nnx object identity or
mutation semantics. Each method merges the (static) graphdef with the given dict, runs the nnx
module and returns arrays, so all methods are pure and jittable.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax.models import decoder
from dpo_jax.models.config import ModelConfig

Params = dict[str, Any]


def _nested(flat: dict[tuple, Any]) -> dict:
    out: dict = {}
    for path, leaf in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = leaf
    return out


class Model:
    """Config + graphdef; pure functions of a parameter dict (see ARCHITECTURE.md)."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        abstract = nnx.eval_shape(lambda: decoder.Decoder(cfg, nnx.Rngs(0)))
        self._graphdef, self._abstract_state = nnx.split(abstract)

    # -- parameters --------------------------------------------------------------------------
    def init(self, rng: jax.Array) -> Params:
        """Random init (GPT-2 style normal(0.02), zero biases, unit norms); jittable, so the
        trainer can run it under jax.jit(out_shardings=...) and never hold an unsharded copy."""
        module = decoder.Decoder(self.cfg, nnx.Rngs(params=rng))
        return nnx.to_pure_dict(nnx.state(module, nnx.Param))

    def abstract_params(self) -> Params:
        """Same tree as `init` with jax.ShapeDtypeStruct leaves (no FLOPs, no memory)."""
        return jax.eval_shape(self.init, jax.random.key(0))

    def logical_axes(self) -> Params:
        """Same tree as `init`; leaves are tuples of logical axis names (None = unsharded)."""
        flat = {
            tuple(path): var.get_metadata()["axes"]
            for path, var in nnx.to_flat_state(self._abstract_state)
        }
        return _nested(flat)

    def _module(self, params: Params) -> decoder.Decoder:
        """A fresh module over `params` (graphdef carries structure and axis metadata); nothing
        is stored on `self`, so tracers never leak between calls."""
        return nnx.merge(self._graphdef, params)

    # -- forward -----------------------------------------------------------------------------
    def hidden(self, params: Params, input_ids_BL: jax.Array, positions_BL: jax.Array,
               segment_ids_BL: jax.Array, branch_ids_BL: jax.Array | None = None,
               router_aux: bool = False, routing: bool = False,
               tree_BL: tuple[jax.Array, jax.Array] | None = None):
        """Final-norm hidden states [B, L, D] in the compute dtype (the loss code projects them
        onto the vocabulary in chunks, so the full [B, L, V] logits need never exist).
        branch_ids_BL: prefix-shared rows (``dpo_jax.data.prefix``), else None. tree_BL:
        preference-tree rows' ``(tree_lo, tree_hi)`` [B, L] (``dpo_jax.data.trees``), else None.
        router_aux=True (mixture-of-experts models): (hidden, the router's load-balancing loss,
        a float32 scalar; ``moe.load_balancing_loss``). routing=True: (hidden, that loss or
        None, each layer's sorted top-k expert ids [n_layer, B, L, K] int32;
        ``moe.routing_agreement``)."""
        return self._module(params)(input_ids_BL, positions_BL, segment_ids_BL, branch_ids_BL,
                                    router_aux, routing, tree_BL)

    def unembedding(self, params: Params, *, caller_applies_softcap: bool = False
                    ) -> tuple[jax.Array, jax.Array | None]:
        """LM head as [V, D] (the input embedding when tied) and its bias [V] or None.

        A config with `final_logit_softcap` (Gemma 2) needs the cap on the projected logits
        (`project(..., softcap=cfg.final_logit_softcap)`); a caller that does so passes
        caller_applies_softcap=True, any other caller gets a ValueError rather than the
        log-probs of a different model.
        """
        if self.cfg.final_logit_softcap is not None and not caller_applies_softcap:
            raise ValueError(
                f"model config has final_logit_softcap={self.cfg.final_logit_softcap} (Gemma 2), "
                "which this caller of Model.unembedding does not apply; apply it with "
                "project(..., softcap=cfg.final_logit_softcap) and pass "
                "caller_applies_softcap=True")
        w = params["embed"] if self.cfg.tie_embeddings else params["lm_head"]
        return w, params.get("lm_head_bias")

    def logits(self, params: Params, input_ids_BL: jax.Array, positions_BL: jax.Array,
               segment_ids_BL: jax.Array, branch_ids_BL: jax.Array | None = None) -> jax.Array:
        """Float32 logits [B, L, V] (with the final soft-cap when the config has one);
        convenience for tests and small models."""
        h = self.hidden(params, input_ids_BL, positions_BL, segment_ids_BL, branch_ids_BL)
        return project(h, *self.unembedding(params, caller_applies_softcap=True),
                       softcap=self.cfg.final_logit_softcap)

    # -- sampling ----------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> decoder.Cache:
        """Empty KV cache for `decode` (see decoder.init_cache)."""
        return decoder.init_cache(self.cfg, batch, max_len, dtype)

    def decode(self, params: Params, input_ids_BT: jax.Array, positions_BT: jax.Array,
               cache: decoder.Cache, segment_ids_BT: jax.Array | None = None
               ) -> tuple[jax.Array, decoder.Cache]:
        """Run T tokens per row against the cache -> (hidden [B,T,D], new cache).

        Prefill a right-padded prompt batch with segment_ids (0 = padding), then feed one token
        per row with positions = each row's length so far. Rows advance independently.
        """
        return self._module(params).decode(input_ids_BT, positions_BT, cache, segment_ids_BT)


def project(h: jax.Array, w_VD: jax.Array, b_V: jax.Array | None = None,
            softcap: float | None = None) -> jax.Array:
    """h [..., D] @ w[V, D]^T (+ b) with float32 accumulation and result; softcap (a model's
    `final_logit_softcap`, Gemma 2): logits -> softcap * tanh(logits / softcap)."""
    # One 2-D matmul over the flattened rows: XLA:CPU runs a dot with leading batch dims
    # more slowly (as decoder._mm).
    logits = jnp.einsum("nd,vd->nv", h.reshape(-1, h.shape[-1]), w_VD.astype(h.dtype),
                        preferred_element_type=jnp.float32).reshape(*h.shape[:-1], -1)
    if b_V is not None:
        logits = logits + b_V.astype(jnp.float32)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    return logits
