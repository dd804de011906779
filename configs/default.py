"""The offline default: DPO on the synthetic preference task (see dpo_jax/data/synthetic.py).

Variants: ``--config=configs/default.py:quick`` (the short run the tests use).
"""

from dpo_jax.config import base_config


def get_config(arg: str = ""):
    config = base_config()
    for variant in filter(None, (arg or "").split(",")):
        if variant == "quick":
            config.train.steps = 60
            config.train.eval_every = 60
            config.train.checkpoint_every = 60
        else:
            raise ValueError(f"unknown variant {variant!r} of configs/default.py (known: quick)")
    return config
