"""Decoder-only transformers (GPT-2, GPT-NeoX, GPT-J, Llama/Mistral/Qwen2, Qwen3, Gemma 2/3,
Phi-3) in flax.nnx, exposed as pure functions over nested-dict parameters (see ARCHITECTURE.md
and docs/models.md)."""

from dpo_jax.models.config import (
    PRESETS,
    ModelConfig,
    flops_per_token,
    matmul_param_count,
    param_count,
    preset,
)
from dpo_jax.models.hf import load_hf_params, save_hf
from dpo_jax.models.hf_config import load_hf_config
from dpo_jax.models.hf_dir import model_config_from
from dpo_jax.models.model import Model, project

__all__ = [
    "PRESETS",
    "Model",
    "ModelConfig",
    "flops_per_token",
    "load_hf_config",
    "load_hf_params",
    "matmul_param_count",
    "model_config_from",
    "param_count",
    "preset",
    "project",
    "save_hf",
]
