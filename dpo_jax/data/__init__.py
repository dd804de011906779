"""Data: sources -> tokenised items -> fixed-shape batch streams (ARCHITECTURE.md).

``BatchStream`` (stream.py) is the one skeleton of epoch, seeded order, process slice and
resumable state; ``PreferencePipeline`` (pairs), ``TextPipeline`` (single sequences) and
``PromptStream`` (prompts) specialise it. ``read_jsonl``/``write_jsonl`` are the one jsonl(.gz)
reader/writer and ``load_tokenizer`` the one tokenizer loader.
"""

from dpo_jax.data.config import DataConfig, default_data_config, read_data
from dpo_jax.data.errors import DataError
from dpo_jax.data.io import read_jsonl, write_jsonl
from dpo_jax.data.loading import build_pipeline, load_tokenised_pairs
from dpo_jax.data.pipeline import PreferencePipeline, pad_id_for, to_global
from dpo_jax.data.prompts import PromptStream
from dpo_jax.data.stream import BatchStream
from dpo_jax.data.text import TextPipeline
from dpo_jax.data.tokenize import load_tokenizer

__all__ = ["BatchStream", "DataConfig", "DataError", "PreferencePipeline", "PromptStream",
           "TextPipeline",
           "build_pipeline", "default_data_config", "load_tokenised_pairs", "load_tokenizer",
           "pad_id_for", "read_data", "read_jsonl", "to_global", "write_jsonl"]
