"""hf_maps.slice_through: reading a device's slice straight from the HF layout; published
config.json files through the importer (no torch)."""

import itertools

import numpy as np

from dpo_jax.models import hf_maps as M
from dpo_jax.models import preset


def test_slice_through_matches_full_transform():
    rng = np.random.default_rng(0)
    cases = [("T", (24, 8), (8, 4, 6)), ("T", (8, 24), (4, 6, 8)), ("R", (8, 24), (8, 4, 6)),
             ("R", (24,), (4, 6)), ("T", (6, 8), (8, 1, 6))]
    checked = 0
    for layout, hf, ours in cases:
        w = rng.normal(size=hf)
        make = M._T if layout == "T" else M._R
        t = make("x", hf, ("p",), ours)
        full = t.split(w)[0]
        opts = [[slice(None)] + [slice(a, min(d, a + max(1, d // 2)))
                                 for a in range(0, d, max(1, d // 2))] for d in ours]
        for idx in itertools.product(*opts):
            plan = M.slice_through(t, ours, idx)
            if plan is None:
                continue
            hf_index, block, residual = plan
            raw = w[hf_index]
            raw = raw.T if layout == "T" else raw
            np.testing.assert_array_equal(raw.reshape(block)[residual], full[idx])
            checked += 1
    assert checked > 50
    fused = M._gpt2(preset("tiny-gpt2"))
    assert M.slice_through(next(t for t in fused if t.layout == "fused"), (32, 4, 8),
                           (slice(None),) * 3) is None


# Published config.json files (hub metadata included): every field is accepted and they import
# to the presets built from the same checkpoints.
HUB_CONFIGS = {
    'gemma-3-1b': {
        'architectures': ['Gemma3ForCausalLM'], 'attention_bias': False, 'attention_dropout': 0.0,
        'attn_logit_softcapping': None, 'bos_token_id': 2, 'cache_implementation': 'hybrid',
        'eos_token_id': [1, 106], 'final_logit_softcapping': None, 'head_dim': 256,
        'hidden_activation': 'gelu_pytorch_tanh', 'hidden_size': 1152, 'initializer_range': 0.02,
        'intermediate_size': 6912, 'max_position_embeddings': 32768, 'model_type': 'gemma3_text',
        'num_attention_heads': 4, 'num_hidden_layers': 26, 'num_key_value_heads': 1,
        'pad_token_id': 0, 'query_pre_attn_scalar': 256, 'rms_norm_eps': 1e-06,
        'rope_local_base_freq': 10000, 'rope_scaling': None, 'rope_theta': 1000000,
        'sliding_window': 512, 'sliding_window_pattern': 6, 'torch_dtype': 'bfloat16',
        'transformers_version': '4.50.0.dev0', 'use_cache': True, 'vocab_size': 262144},
    'gemma-2-2b': {
        'architectures': ['Gemma2ForCausalLM'], 'attention_bias': False, 'attention_dropout': 0.0,
        'attn_logit_softcapping': 50.0, 'bos_token_id': 2, 'cache_implementation': 'hybrid',
        'eos_token_id': [1, 107], 'final_logit_softcapping': 30.0, 'head_dim': 256,
        'hidden_act': 'gelu_pytorch_tanh', 'hidden_activation': 'gelu_pytorch_tanh',
        'hidden_size': 2304, 'initializer_range': 0.02, 'intermediate_size': 9216,
        'max_position_embeddings': 8192, 'model_type': 'gemma2', 'num_attention_heads': 8,
        'num_hidden_layers': 26, 'num_key_value_heads': 4, 'pad_token_id': 0,
        'query_pre_attn_scalar': 256, 'rms_norm_eps': 1e-06, 'rope_theta': 10000.0,
        'sliding_window': 4096, 'torch_dtype': 'float32', 'transformers_version': '4.42.4',
        'use_cache': True, 'vocab_size': 256000},
    'phi-3-mini': {
        '_name_or_path': 'Phi-3-mini-4k-instruct', 'architectures': ['Phi3ForCausalLM'],
        'attention_dropout': 0.0,
        'auto_map': {'AutoConfig': 'configuration_phi3.Phi3Config',
                     'AutoModelForCausalLM': 'modeling_phi3.Phi3ForCausalLM'},
        'bos_token_id': 1, 'embd_pdrop': 0.0, 'eos_token_id': 32000, 'hidden_act': 'silu',
        'hidden_size': 3072, 'initializer_range': 0.02, 'intermediate_size': 8192,
        'max_position_embeddings': 4096, 'model_type': 'phi3', 'num_attention_heads': 32,
        'num_hidden_layers': 32, 'num_key_value_heads': 32,
        'original_max_position_embeddings': 4096, 'pad_token_id': 32000, 'resid_pdrop': 0.0,
        'rms_norm_eps': 1e-05, 'rope_scaling': None, 'rope_theta': 10000.0, 'sliding_window': 2047,
        'tie_word_embeddings': False, 'torch_dtype': 'bfloat16', 'transformers_version': '4.40.2',
        'use_cache': True, 'attention_bias': False, 'vocab_size': 32064},
    'qwen3-0.6b': {
        'architectures': ['Qwen3ForCausalLM'], 'attention_bias': False, 'attention_dropout': 0.0,
        'bos_token_id': 151643, 'eos_token_id': 151645, 'head_dim': 128, 'hidden_act': 'silu',
        'hidden_size': 1024, 'initializer_range': 0.02, 'intermediate_size': 3072,
        'max_position_embeddings': 40960, 'max_window_layers': 28, 'model_type': 'qwen3',
        'num_attention_heads': 16, 'num_hidden_layers': 28, 'num_key_value_heads': 8,
        'rms_norm_eps': 1e-06, 'rope_scaling': None, 'rope_theta': 1000000, 'sliding_window': None,
        'tie_word_embeddings': True, 'torch_dtype': 'bfloat16', 'transformers_version': '4.51.0',
        'use_cache': True, 'use_sliding_window': False, 'vocab_size': 151936},
    'mistral-7b': {
        'architectures': ['MistralForCausalLM'], 'bos_token_id': 1, 'eos_token_id': 2,
        'hidden_act': 'silu', 'hidden_size': 4096, 'initializer_range': 0.02,
        'intermediate_size': 14336, 'max_position_embeddings': 32768, 'model_type': 'mistral',
        'num_attention_heads': 32, 'num_hidden_layers': 32, 'num_key_value_heads': 8,
        'rms_norm_eps': 1e-05, 'rope_theta': 10000.0, 'sliding_window': 4096,
        'tie_word_embeddings': False, 'torch_dtype': 'bfloat16',
        'transformers_version': '4.34.0.dev0', 'use_cache': True, 'vocab_size': 32000},
    'gpt2': {
        'activation_function': 'gelu_new', 'architectures': ['GPT2LMHeadModel'], 'attn_pdrop': 0.1,
        'bos_token_id': 50256, 'embd_pdrop': 0.1, 'eos_token_id': 50256, 'initializer_range': 0.02,
        'layer_norm_epsilon': 1e-05, 'model_type': 'gpt2', 'n_ctx': 1024, 'n_embd': 768,
        'n_head': 12, 'n_layer': 12, 'n_positions': 1024, 'resid_pdrop': 0.1,
        'summary_activation': None, 'summary_first_dropout': 0.1, 'summary_proj_to_labels': True,
        'summary_type': 'cls_index', 'summary_use_proj': True,
        'task_specific_params': {'text-generation': {'do_sample': True, 'max_length': 50}},
        'vocab_size': 50257},
}


def test_published_configs_import_to_their_presets():
    from dpo_jax.models.hf_config import hf_config_to_model_config

    for name, c in HUB_CONFIGS.items():
        assert hf_config_to_model_config(c) == preset(name), name
