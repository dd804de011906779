"""Preference data: sources -> tokenised pairs -> fixed-shape batches (ARCHITECTURE.md)."""

from dpo_jax.data.config import default_data_config
from dpo_jax.data.errors import DataError
from dpo_jax.data.pipeline import PreferencePipeline, build_pipeline, to_global
from dpo_jax.data.tokenize import load_tokenizer

__all__ = ["DataError", "PreferencePipeline", "build_pipeline", "default_data_config",
           "load_tokenizer", "to_global"]
