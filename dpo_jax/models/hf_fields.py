"""Which Hugging Face config.json fields the importer accepts, by kind, and which it refuses.

A config.json of a published checkpoint carries far more than the architecture: transformers'
`PretrainedConfig` common attributes, generation settings older transformers versions saved in
the model config, classification-head settings, training-only settings, runtime hints, other
libraries' markers and legacy duplicates of a field that is read. None of them changes the
logits of a causal LM, so each is accepted by its KIND (the tables below). A field that is
none of these and is not read by its model_type's mapping (`IMPLEMENTED`) may change the
computation: `check_fields` refuses it by name, with its value. Policy documented in
docs/models.md ("config.json fields").

Sources: transformers 4.x/5.x `configuration_utils.PretrainedConfig` (common attributes and the
`GenerationConfig._get_default_generation_params()` keys it pops), and each family's
`configuration_<family>.py`.
"""

from __future__ import annotations

# 1. PretrainedConfig's common attributes (4.x and 5.x) that a causal LM's forward never reads:
#    output switches, the task-head label maps, dtype / serialisation hints, the class names.
COMMON = frozenset({
    "architectures", "model_type", "dtype", "torch_dtype", "use_bfloat16", "return_dict",
    "use_return_dict", "output_hidden_states", "output_attentions", "torchscript",
    "tf_legacy_loss", "chunk_size_feed_forward",  # chunking the MLP over positions: same values
    "is_decoder", "finetuning_task", "tokenizer_class", "prefix", "task_specific_params",
    "keys_to_ignore_at_inference", "auto_map", "custom_pipelines", "tie_last_hidden_states",
    "attn_implementation", "experts_implementation", "_attn_implementation",
    "_attn_implementation_internal", "_experts_implementation",
    "_experts_implementation_internal", "_commit_hash", "_auto_class"})
# 2. Generation settings older transformers saved in the model config (5.x pops exactly these
#    on load: GenerationConfig._get_default_generation_params(), plus 4.x's output_past):
#    they steer `generate`, never the forward. dpo_jax's sampler takes its own settings.
GENERATION = frozenset({
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "encoder_repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "epsilon_cutoff", "eta_cutoff", "assistant_confidence_threshold",
    "assistant_lookbehind", "num_assistant_tokens", "num_assistant_tokens_schedule",
    "target_lookbehind", "use_cache", "output_past", "cache_implementation"})
# 3. Task heads (sequence classification / GPT-2's double-heads summary): not in a causal LM.
TASK_HEAD = frozenset({
    "id2label", "label2id", "num_labels", "_num_labels", "problem_type", "summary_type",
    "summary_use_proj", "summary_activation", "summary_proj_to_labels", "summary_first_dropout"})
# 4. Training-only settings: initialisation, gradient checkpointing, the router loss weight
#    (inert for dense models; the mixture-of-experts types read it into
#    ModelConfig.router_aux_loss_coef, hf_moe.py, TRL 1.16's default weight). Any "*dropout*" / "*pdrop" field is dropout,
#    which dpo_jax never applies (as TRL's default disable_dropout=True).
TRAINING = frozenset({
    "initializer_range", "initializer_factor", "init_std", "gradient_checkpointing",
    "use_gradient_checkpointing", "router_aux_loss_coef",
    # Llama's pretraining_tp splits each matmul into that many slices and sums them
    # (transformers 4.x; 5.x ignores it): the same sums in another order, not another model.
    "pretraining_tp"})
# 5. Fields that change nothing only at these values; any other value is refused.
ONLY_AT = {"is_encoder_decoder": (False, None), "add_cross_attention": (False, None),
           "tie_encoder_decoder": (False, None), "cross_attention_hidden_size": (None,),
           "pruned_heads": ({}, None), "per_layer_config": ({}, None),
           "use_mrope": (False, None), "use_bidirectional_attention": (False, None),
           "scale_attn_by_inverse_layer_idx": (False, None), "scale_attn_weights": (True, None),
           "attention_bias": (False, None), "mlp_bias": (False, None),
           "output_router_logits": (False, None)}
# 6. Legacy duplicates of a field the mapping reads: accepted when equal to it (a different
#    value leaves which one the checkpoint was trained with ambiguous: refused).
DUPLICATES = {"gemma2": {"hidden_act": "hidden_activation", "sliding_window_size":
                         "sliding_window"},
              "gemma3_text": {"hidden_act": "hidden_activation"},
              # transformers 5 writes Qwen3MoeConfig.num_experts under its attribute_map name
              "qwen3_moe": {"num_local_experts": "num_experts"}}
# 7. Refused with a reason even though they look like metadata.
REFUSED = {"quantization_config": "the checkpoint's weights are quantized (bitsandbytes / GPTQ / "
                                  "AWQ / ...); dpo_jax reads float safetensors: dequantize the "
                                  "checkpoint first (transformers: from_pretrained then "
                                  "save_pretrained without quantization_config)"}

_LLAMA_LIKE = {"vocab_size", "num_hidden_layers", "hidden_size", "num_attention_heads",
               "num_key_value_heads", "head_dim", "intermediate_size", "max_position_embeddings",
               "rms_norm_eps", "hidden_act", "tie_word_embeddings", "rope_theta", "rope_scaling",
               "rope_parameters"}
# The fields each model_type's mapping (hf_config.py) reads and implements; values checked there.
IMPLEMENTED = {
    "gpt2": {"vocab_size", "n_layer", "n_embd", "n_head", "n_inner", "n_positions",
             "layer_norm_epsilon", "activation_function", "tie_word_embeddings",
             "n_ctx",  # GPT2Config's legacy context size; the model reads n_positions
             "reorder_and_upcast_attn"},  # float32 attention scores: ours always are
    "gpt_neox": {"vocab_size", "num_hidden_layers", "hidden_size", "num_attention_heads",
                 "intermediate_size", "max_position_embeddings", "layer_norm_eps", "hidden_act",
                 "rotary_pct", "partial_rotary_factor", "rotary_emb_base", "rope_theta",
                 "rope_scaling", "rope_parameters", "use_parallel_residual",
                 "tie_word_embeddings", "attention_bias"},
    "gptj": {"vocab_size", "n_layer", "n_embd", "n_head", "n_inner", "n_positions",
             "layer_norm_epsilon", "activation_function", "rotary_dim", "rope_theta",
             "tie_word_embeddings"},
    "llama": _LLAMA_LIKE | {"attention_bias", "mlp_bias"},
    "mistral": _LLAMA_LIKE | {"sliding_window"},
    "qwen2": _LLAMA_LIKE | {"use_sliding_window", "sliding_window", "max_window_layers",
                            "layer_types"},
    "qwen3": _LLAMA_LIKE | {"attention_bias", "use_sliding_window", "sliding_window",
                            "max_window_layers", "layer_types"},
    "gemma2": _LLAMA_LIKE - {"hidden_act"} | {"hidden_activation", "attention_bias", "query_pre_attn_scalar",
                             "attn_logit_softcapping", "final_logit_softcapping",
                             "sliding_window", "layer_types"},
    "gemma3_text": _LLAMA_LIKE - {"hidden_act"} | {"hidden_activation", "attention_bias", "query_pre_attn_scalar",
                                  "attn_logit_softcapping", "final_logit_softcapping",
                                  "sliding_window", "layer_types", "sliding_window_pattern",
                                  "_sliding_window_pattern", "rope_local_base_freq"},
    "phi3": _LLAMA_LIKE | {"sliding_window", "partial_rotary_factor",
                           "original_max_position_embeddings"},  # read by longrope only
    # router_jitter_noise (training-time noise) and output_router_logits (TRL's router loss):
    # refused unless 0 / false, in hf_config._moe.
    "mixtral": _LLAMA_LIKE | {"sliding_window", "num_local_experts", "num_experts_per_tok",
                              "router_jitter_noise", "output_router_logits"},
    "qwen2_moe": _LLAMA_LIKE | {"use_sliding_window", "sliding_window", "max_window_layers",
                                "layer_types", "qkv_bias", "num_experts", "num_experts_per_tok",
                                "moe_intermediate_size", "shared_expert_intermediate_size",
                                "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
                                "output_router_logits"},
    "qwen3_moe": _LLAMA_LIKE | {"attention_bias", "use_sliding_window", "sliding_window",
                                "max_window_layers",
                                "num_experts", "num_experts_per_tok", "moe_intermediate_size",
                                "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
                                "output_router_logits"},
}
SUPPORTED_MODEL_TYPES = tuple(IMPLEMENTED)


def inert_kind(key: str, value) -> str | None:
    """The kind of a field that never changes a causal LM's logits, or None.

    Kinds: 'common' (PretrainedConfig attributes), 'generation', 'task head', 'training'
    (incl. any '*dropout*' / '*pdrop' name), 'token id' (any '*_token_id(s)': tokenizer ids,
    read by generation and data code, not the forward), 'marker' (names, versions and commit
    hashes written by transformers or other libraries: '*name_or_path', '*_version' with a
    string value).
    """
    if key in COMMON:
        return "common"
    if key in GENERATION:
        return "generation"
    if key in TASK_HEAD:
        return "task head"
    if key in TRAINING or "dropout" in key or key.endswith("pdrop"):
        return "training"
    if key.endswith(("_token_id", "_token_ids")):
        return "token id"
    if key.endswith("name_or_path") or (key.endswith("_version") and isinstance(value, str)):
        return "marker"
    return None


# Pre-2020 configs (e.g. distilgpt2) have no model_type; their causal-LM class names it.
_ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "GPTNeoXForCausalLM": "gpt_neox",
                  "GPTJForCausalLM": "gptj", "LlamaForCausalLM": "llama",
                  "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
                  "Qwen3ForCausalLM": "qwen3", "Gemma2ForCausalLM": "gemma2",
                  "Gemma3ForCausalLM": "gemma3_text", "Phi3ForCausalLM": "phi3",
                  "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
                  "Qwen3MoeForCausalLM": "qwen3_moe"}


def model_type_of(c: dict, source: str = "config.json") -> str:
    """config.json's model_type; when absent, the one its single `architectures` class names
    (GPT2LMHeadModel -> gpt2, ...). ValueError naming the field when it is absent and cannot be
    told, or names an unsupported family."""
    mt = c.get("model_type")
    if mt is None:
        archs = c.get("architectures") or []
        found = {_ARCHITECTURES.get(a) for a in archs}
        if len(found) == 1 and None not in found:
            return found.pop()
        raise ValueError(
            f"{source}: field 'model_type' is absent and architectures = {archs!r} names no "
            f"supported causal LM; dpo_jax needs it to choose the model's computation: set "
            f"model_type to one of {SUPPORTED_MODEL_TYPES}")
    if mt not in IMPLEMENTED:
        raise ValueError(f"{source}: field 'model_type' = {mt!r} is not a supported family; "
                         f"supported: {SUPPORTED_MODEL_TYPES}")
    return mt


def check_fields(c: dict, source: str = "config.json") -> None:
    """Refuse a config.json that asks for something the importer does not implement.

    Every field must be read by its model_type's mapping (`IMPLEMENTED`), inert by kind
    (`inert_kind`), at a value that changes nothing (`ONLY_AT`) or a legacy duplicate equal to
    the field it duplicates (`DUPLICATES`); anything else is a ValueError naming `source`, the
    field and its value, never a silently different model. model_type: see `model_type_of`.
    """
    mt = model_type_of(c, source)
    duplicates = DUPLICATES.get(mt, {})
    for key, value in c.items():
        if key in REFUSED:
            raise ValueError(f"{source}: field {key!r} = {value!r}: {REFUSED[key]}")
        if key in IMPLEMENTED[mt] or inert_kind(key, value) is not None:
            continue
        if key in ONLY_AT:
            if value not in ONLY_AT[key]:
                raise ValueError(f"{source}: field {key!r} = {value!r} (model_type {mt!r}) is "
                                 f"not implemented; only {ONLY_AT[key]} are")
            continue
        if key in duplicates:
            read = duplicates[key]
            if read in c and c[read] != value:
                raise ValueError(f"{source}: field {key!r} = {value!r} (a legacy duplicate of "
                                 f"{read!r}) differs from {read!r} = {c[read]!r}; make them "
                                 f"equal or remove {key!r}")
            continue
        raise ValueError(
            f"{source}: field {key!r} = {value!r} is not implemented for model_type {mt!r} "
            f"and may change the computation; refusing rather than importing a different model "
            f"(if it is only metadata, remove it from config.json)")
