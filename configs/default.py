"""The offline default: DPO on the synthetic preference task (see dpo_jax/data/synthetic.py).

Variants: ``--config=configs/default.py:quick`` (the short run the tests use).
"""

from dpo_jax.config import apply_variants, base_config, short_run


def get_config(arg: str = ""):
    return apply_variants(base_config(), arg, {"quick": short_run(60)}, "configs/default.py")
