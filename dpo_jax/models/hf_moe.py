"""config.json <-> ModelConfig for the mixture-of-experts families (Mixtral, Qwen2-MoE,
Qwen3-MoE): the expert fields read on import and written on export (hf_config.py calls these
for its model types)."""

from __future__ import annotations

from typing import Any

from dpo_jax.models.config import ModelConfig

MOE_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")


def _sparse_every_layer(c: dict, mt: str) -> None:
    """Qwen2/3-MoE: layer i is sparse iff i not in mlp_only_layers and (i + 1) %
    decoder_sparse_step == 0; dense layers between sparse ones are not implemented (one stacked
    layer scan), so anything but every layer sparse is a ValueError naming the field."""
    step, only = c.get("decoder_sparse_step", 1), c.get("mlp_only_layers") or []
    if step != 1 or only:
        field, value = ("decoder_sparse_step", step) if step != 1 else ("mlp_only_layers", only)
        raise ValueError(f"config.json field {field!r} = {value!r} (model_type {mt!r}) is not "
                         "implemented: every layer must be a mixture-of-experts layer "
                         "(decoder_sparse_step 1, mlp_only_layers [])")


def moe_fields(c: dict, mt: str) -> dict:
    """The ModelConfig fields of a Mixtral / Qwen2-MoE / Qwen3-MoE config.json: the experts, the
    router's normalisation, (Qwen2-MoE) the shared expert and q/k/v biases, (Qwen3-MoE) q/k
    norms and attention_bias. Settings that would make a different model or a different
    training objective are ValueErrors naming the field and value. `router_aux_loss_coef`: the
    field, else transformers' class default 0.001."""
    out = _fields(c, mt)
    # TRL 1.16 reads the model config's router_aux_loss_coef (the class default 0.001 of all
    # three when the file has none) as its default weight; output_router_logits, whatever its
    # value, changes neither the logits nor TRL's objective (TRL asks for the router logits in
    # its forward call)
    out["router_aux_loss_coef"] = float(c.get("router_aux_loss_coef", 0.001))
    return out


def _fields(c: dict, mt: str) -> dict:
    if mt == "mixtral":
        if c.get("router_jitter_noise") not in (None, 0, 0.0):
            raise ValueError(f"config.json field 'router_jitter_noise' = "
                             f"{c['router_jitter_noise']!r} (model_type 'mixtral') is not "
                             "implemented; only 0 is (no multiplicative noise on the router "
                             "input in training)")
        return dict(family="mixtral", n_experts=c.get("num_local_experts", 8),
                    n_experts_per_tok=c.get("num_experts_per_tok", 2), moe_renormalize=True)
    _sparse_every_layer(c, mt)
    if mt == "qwen3_moe":
        if c.get("use_sliding_window") and "max_window_layers" in c:
            raise ValueError(
                f"config.json field 'max_window_layers' = {c['max_window_layers']!r} with "
                "use_sliding_window true (model_type 'qwen3_moe'): transformers 4.x slides only "
                "the layers from max_window_layers on, 5.x every layer; remove the field (every "
                "layer slides) or set use_sliding_window false")
        bias = bool(c.get("attention_bias", False))
        return dict(family="qwen3_moe", qk_norm=True, qkv_bias=bias, attn_out_bias=bias,
                    n_experts=c.get("num_experts", c.get("num_local_experts", 128)),
                    n_experts_per_tok=c.get("num_experts_per_tok", 8),
                    moe_d_ff=c.get("moe_intermediate_size", 768),
                    moe_renormalize=bool(c.get("norm_topk_prob", False)))
    bias = bool(c.get("qkv_bias", True))
    return dict(family="qwen2_moe", qkv_bias=bias, n_experts=c.get("num_experts", 60),
                n_experts_per_tok=c.get("num_experts_per_tok", 4),
                moe_d_ff=c.get("moe_intermediate_size", 1408),
                shared_expert_d_ff=c.get("shared_expert_intermediate_size", 5632),
                moe_renormalize=bool(c.get("norm_topk_prob", False)))


def moe_config_json(cfg: ModelConfig, act: str, sliding: dict, body: dict[str, Any]) -> dict:
    """config.json of a mixture-of-experts ModelConfig (hf_config.model_config_to_hf's
    `act`, `sliding` and common `body`)."""
    experts = dict(num_experts_per_tok=cfg.n_experts_per_tok,
                   router_aux_loss_coef=cfg.router_aux_loss_coef)
    if cfg.family == "mixtral":
        return dict(model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_act=act,
                    sliding_window=cfg.sliding_window, num_local_experts=cfg.n_experts,
                    **experts, **body)
    experts.update(num_experts=cfg.n_experts, moe_intermediate_size=cfg.moe_d_ff,
                   norm_topk_prob=cfg.moe_renormalize, decoder_sparse_step=1,
                   mlp_only_layers=[])
    if cfg.family == "qwen2_moe":
        return dict(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"],
                    hidden_act=act, qkv_bias=cfg.qkv_bias, use_sliding_window=bool(sliding),
                    **sliding, shared_expert_intermediate_size=cfg.shared_expert_d_ff,
                    **experts, **body)
    # qwen3_moe: every layer slides when use_sliding_window (Qwen3MoeConfig has no layer_types)
    return dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_act=act,
                attention_bias=cfg.qkv_bias, use_sliding_window=bool(sliding),
                sliding_window=cfg.sliding_window, **experts, **body)
