"""Reward model (Bradley-Terry, the paper's Eq. 2) on the synthetic preference task.

``python -m dpo_jax.main --config=configs/reward_synthetic.py --workdir=runs/rm``
Variants: ``quick`` (a short run for smoke tests).
"""

from dpo_jax.config import base_config


def get_config(arg: str = ""):
    config = base_config()
    config.task = "reward"
    config.train.steps = 200
    config.train.eval_every = 100
    config.train.checkpoint_every = 100
    for variant in filter(None, (arg or "").split(",")):
        if variant == "quick":
            config.train.steps = 60
            config.train.eval_every = 60
            config.train.checkpoint_every = 60
        else:
            raise ValueError(f"unknown variant {variant!r} of configs/reward_synthetic.py")
    return config
