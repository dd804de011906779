"""Mixture-of-experts MLP (Mixtral, Qwen2-MoE) and the router's load-balancing loss.

Experts are stacked parameters with a leading logical `expert` axis (after the decoder's
`layers` axis), so the mesh rules can shard them like any other axis (sharding.DEFAULT_RULES:
`expert` -> `fsdp`). Parameter tree under `layers/mlp` (E experts, F = moe_d_ff, S =
shared_expert_d_ff):

  router [L, D, E] ('layers', 'embed', None)
  gate, up [L, E, D, F] ('layers', 'expert', 'embed', 'mlp'); down [L, E, F, D]
  shared/{gate, up} [L, D, S], shared/down [L, S, D], shared_gate [L, D] (Qwen2-MoE only)

Routing as transformers' MixtralTopKRouter / Qwen2MoeTopKRouter: probabilities are the float32
softmax of the router logits, each token keeps its `n_experts_per_tok` most probable experts,
weighted by those probabilities (Mixtral: divided by their sum, `moe_renormalize`; Qwen2-MoE
renormalises only with `norm_topk_prob`). Qwen2-MoE adds a shared gated MLP on every token,
scaled by sigmoid(x . shared_gate).

Shape suffixes: B batch, T tokens, D d_model, E experts, K top-k, F expert width, L layers.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax.models import moe_dispatch, moe_parallel, quant
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.layers import activation

# (probabilities [B, T, E] float32, top-k indicator [B, T, E] float32 0/1, the top-k expert ids
# in ascending order [B, T, K] int32) of one layer
RouterStats = tuple[jax.Array, jax.Array, jax.Array]


def _gated(cfg: ModelConfig, x: jax.Array, gate, up, down, spec: str) -> jax.Array:
    """down(act(x @ gate) * (x @ up)) with the einsum `spec` ('in,hid' form for each matmul);
    a weight is an array in x's dtype or a QLoRA base's quantised one (`_einsum`)."""
    first, second = spec.split(";")
    h = activation(cfg.activation, _einsum(first, x, gate)) * _einsum(first, x, up)
    return _einsum(second, h, down)


def _einsum(spec: str, x: jax.Array, w) -> jax.Array:
    """einsum(spec, x, w); a quantised w (a LoRA run's quantised base, models/quant.py): a
    shared expert's projection (`quant.QuantLinear`, [..., I] -> [..., O]) or one layer's
    experts (`quant.Experts`), dequantised inside `jax.checkpoint` (recomputed, never stored,
    for the backward)."""
    if isinstance(w, quant.QuantLinear):
        return w(x)
    if isinstance(w, quant.Experts):
        return jax.checkpoint(lambda x, w: jnp.einsum(spec, x, w.whole(x.dtype)))(x, w)
    return jnp.einsum(spec, x, w)


class MoE(nnx.Module):
    """Top-k routed experts (+ Qwen2-MoE's shared expert) in place of the dense MLP.

    `param(shape, axes, init='normal')` makes one stacked parameter (the decoder prepends the
    `layers` axis), so this module needs nothing else from the decoder.

    `cfg.moe_impl='sparse'` (the default): dropless sorted dispatch through grouped matmuls
    (moe_dispatch.py), the FLOPs of the k selected experts per token. `'dense'`: the reference
    implementation: every token runs through every expert and one-hot combine weights
    [B, T, E] (zero off the top-k) sum their outputs; exact (an unselected expert's output is
    multiplied by 0) but n_experts / n_experts_per_tok times the expert FLOPs (4x for
    Mixtral's 8 experts, top-2) and activations [B, T, E, F]. Under a QLoRA base
    (`model.lora.base_quant`) the experts and the shared expert's projections are quantised
    (`quant.Experts`, `quant.QuantLinear`) and dequantised inside the matmuls; the router and
    the shared expert's gate stay float. Both give the same numbers to
    round-off (tests/test_moe_sparse.py). Sparse with `cfg.moe_expert_axis` set and traced
    under a `jax.set_mesh` mesh where that axis has > 1 device: expert parallelism, the copies
    exchanged by all_to_all (moe_parallel.py; the same numbers, tests/test_moe_parallel.py).
    """

    def __init__(self, cfg: ModelConfig, param: Callable[..., nnx.Param]):
        self.cfg = cfg
        D, E, F, S = cfg.d_model, cfg.n_experts, cfg.moe_d_ff, cfg.shared_expert_d_ff
        self.router = param((D, E), ("embed", None))
        self.gate = param((E, D, F), ("expert", "embed", "mlp"))
        self.up = param((E, D, F), ("expert", "embed", "mlp"))
        self.down = param((E, F, D), ("expert", "mlp", "embed"))
        if S:
            self.shared = nnx.Dict(gate=param((D, S), ("embed", "mlp")),
                                   up=param((D, S), ("embed", "mlp")),
                                   down=param((S, D), ("mlp", "embed")))
            self.shared_gate = param((D,), (None,))

    def __call__(self, x_BTD: jax.Array) -> tuple[jax.Array, RouterStats]:
        """[B, T, D] -> ([B, T, D], router statistics of this layer)."""
        cfg, dt = self.cfg, x_BTD.dtype
        logits_BTE = jnp.einsum("btd,de->bte", x_BTD, self.router[...].astype(dt))
        weight_BTK, index_BTK, stats = top_k_routing(logits_BTE, cfg.n_experts_per_tok,
                                                     cfg.moe_renormalize)
        # a QLoRA base's quantised experts / shared projections stay quantised here
        w = lambda p: (p.experts() if isinstance(p, quant.QuantExperts) else p
                       if isinstance(p, quant.QuantLinear) else p[...].astype(dt))
        if cfg.moe_impl == "dense":
            combine_BTE = combine_weights(weight_BTK, index_BTK, cfg.n_experts)
            y_BTED = _gated(cfg, x_BTD, w(self.gate), w(self.up), w(self.down),
                            "btd,edf->btef;btef,efd->bted")
            y_BTD = jnp.einsum("bted,bte->btd", y_BTED, combine_BTE.astype(dt))
        else:
            B, T, D = x_BTD.shape
            K = cfg.n_experts_per_tok
            args = (cfg.activation, x_BTD.reshape(B * T, D), index_BTK.reshape(B * T, K),
                    weight_BTK.reshape(B * T, K), w(self.gate), w(self.up), w(self.down))
            mesh = moe_parallel.expert_mesh(cfg.moe_expert_axis)
            if mesh is None:
                y_TD = moe_dispatch.sparse_experts(*args, cfg.moe_kernel, cfg.moe_tile)
            else:
                y_TD = moe_parallel.expert_parallel(*args, mesh=mesh, axis=cfg.moe_expert_axis,
                                                    kernel=cfg.moe_kernel, tile=cfg.moe_tile)
            y_BTD = y_TD.reshape(B, T, D)
        if cfg.shared_expert_d_ff:
            shared_BTD = _gated(cfg, x_BTD, w(self.shared["gate"]), w(self.shared["up"]),
                                w(self.shared["down"]), "btd,df->btf;btf,fd->btd")
            scale_BT1 = jax.nn.sigmoid(x_BTD @ w(self.shared_gate))[..., None]
            y_BTD = y_BTD + scale_BT1 * shared_BTD
        return y_BTD, stats


def top_k_routing(logits_BTE: jax.Array, k: int, renormalize: bool
                  ) -> tuple[jax.Array, jax.Array, RouterStats]:
    """Router logits [B, T, E] -> (weights [B, T, K] float32: the softmax probabilities of each
    token's k most probable experts, divided by their sum when `renormalize`; those experts'
    ids [B, T, K] int32, most probable first (ties: the lower id, as torch.topk); the router
    statistics RouterStats of `load_balancing_loss` and `routing_agreement`)."""
    probs_BTE = jax.nn.softmax(logits_BTE.astype(jnp.float32), axis=-1)
    top_BTK, index_BTK = jax.lax.top_k(probs_BTE, k)
    if renormalize:
        top_BTK = top_BTK / jnp.sum(top_BTK, axis=-1, keepdims=True)
    chosen_BTE = jnp.sum(jax.nn.one_hot(index_BTK, logits_BTE.shape[-1], dtype=jnp.float32),
                         axis=2)
    index_BTK = index_BTK.astype(jnp.int32)
    return top_BTK, index_BTK, (probs_BTE, chosen_BTE, jnp.sort(index_BTK, axis=-1))


def combine_weights(weight_BTK: jax.Array, index_BTK: jax.Array, n_experts: int) -> jax.Array:
    """The dense dispatch's combine weights [B, T, E] float32: weight_BTK at each token's
    selected experts, 0 elsewhere."""
    onehot_BTKE = jax.nn.one_hot(index_BTK, n_experts, dtype=jnp.float32)
    return jnp.einsum("btk,btke->bte", weight_BTK, onehot_BTKE)


def router_aux_coef(requested: float | None, cfg: ModelConfig) -> float:
    """The router loss weight a run uses, resolved as TRL 1.16 resolves DPOConfig /
    SFTConfig.router_aux_loss_coef (TRL PR #6208): None (the default) -> the weight the model
    config declares (`cfg.router_aux_loss_coef`: config.json's field, else transformers' class
    default; 0.02 for Mixtral-8x7B, 0.001 for Qwen2/3-MoE) for a mixture-of-experts model, 0
    (off) for a dense one; a number as given (0: off). ValueError for a positive weight on a
    model without experts (TRL refuses it too)."""
    if requested is None:
        return float(cfg.router_aux_loss_coef) if cfg.n_experts else 0.0
    if requested > 0 and not cfg.n_experts:
        raise ValueError(f"loss.router_aux_loss_coef = {requested} weights the router loss of a "
                         "mixture-of-experts model, but this model has no experts "
                         "(n_experts = 0): set it to None or 0")
    return float(requested)


def load_balancing_loss(stats_L: RouterStats, token_mask_BT: jax.Array) -> jax.Array:
    """The router's auxiliary load-balancing loss over all layers (Switch Transformer eq. 4-6,
    as transformers' `load_balancing_loss_func` with an attention mask).

    stats_L: (probabilities, top-k indicator, ...), each [L, B, T, E] (`MoE.__call__` per
    layer, stacked; the expert ids are not read); token_mask_BT: 1 for real tokens, 0 for padding. With n = L * (real tokens),
    f_e = (top-k assignments to e) / n and P_e = (summed probability of e) / n over every layer,
    the loss is E * sum_e f_e P_e (E * k when perfectly balanced; the gradient flows through
    P only). Float32 scalar.
    """
    probs_LBTE, chosen_LBTE = stats_L[:2]
    m = token_mask_BT.astype(jnp.float32)[None, :, :, None]
    n = jnp.maximum(probs_LBTE.shape[0] * jnp.sum(token_mask_BT.astype(jnp.float32)), 1.0)
    tokens_E = jnp.sum(chosen_LBTE * m, axis=(0, 1, 2)) / n
    probs_E = jnp.sum(probs_LBTE * m, axis=(0, 1, 2)) / n
    return probs_LBTE.shape[-1] * jnp.sum(tokens_E * probs_E)


def routing_agreement(experts_LBTK: jax.Array, ref_experts_LBTK: jax.Array,
                      token_mask_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """How far training moved the router: per layer, the number of masked tokens whose top-k
    expert set is the same under the policy and the reference (float32 [L]), and the number of
    masked tokens (float32 []). experts: the sorted top-k ids of each forward ([L, B, T, K],
    `Model.hidden(..., routing=True)`); token_mask_BT: the tokens counted (the scored ones)."""
    same_LBT = jnp.all(experts_LBTK == ref_experts_LBTK, axis=-1).astype(jnp.float32)
    m_BT = token_mask_BT.astype(jnp.float32)
    return jnp.sum(same_LBT * m_BT[None], axis=(1, 2)), jnp.sum(m_BT)
