"""The offline default: DPO on the synthetic preference task (see dpo_jax/data/synthetic.py).

Variants: ``--config=configs/default.py:quick`` (the short run the tests use).
"""

from dpo_jax.config import get_config  # noqa: F401  (the same file main loads by default)
