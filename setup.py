"""dpo_jax: Direct Preference Optimization and its loss family in pure JAX."""

from setuptools import find_packages, setup

setup(
    name="dpo_jax",
    version="0.1.0",
    description="Pure-JAX, sharded Direct Preference Optimization (DPO) and preference losses",
    packages=find_packages(include=["dpo_jax", "dpo_jax.*"]),
    python_requires=">=3.10",
    # Ranges, not pins: Python 3.11 here resolves jax 0.10.x / flax 0.12.x; GPU hosts run
    # Python 3.12 with jax 0.11.x.
    install_requires=[
        "jax>=0.7,<0.13",
        "flax>=0.12,<0.15",
        "optax>=0.2.4,<0.4",
        "orbax-checkpoint>=0.11,<1",
        "transformers>=4.45,<6",
        "datasets>=3.0,<6",
        "safetensors>=0.4",
        "ml_collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "pyarrow>=14",
        "tensorboardX>=2.6",
        "tokenizers>=0.19",
        "huggingface_hub>=0.23",
        "matplotlib>=3.8",  # frontier.png of the IMDb experiment
        "beautifulsoup4>=4.12",  # the se source cleans StackExchange HTML as the paper's code
        # transformers imports it lazily, only when a chat template is applied
        # (data/tokenize.py: tokenizer.apply_chat_template); not among its own requirements
        "jinja2>=3.1",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-xdist>=3.5"],
        "wandb": ["wandb>=0.17"],  # log.wandb_project: metrics to Weights & Biases
        # python -m dpo_jax.export --format=gguf (llama.cpp's own GGUF writer and quantizers);
        # an extra: only that export needs it, and dpo_jax/export_gguf.py names it when absent
        "gguf": ["gguf>=0.10"],
    },
)
