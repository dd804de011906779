"""Reward model (Bradley-Terry, the paper's Eq. 2) on the synthetic preference task.

``python -m dpo_jax.main --config=configs/reward_synthetic.py --workdir=runs/rm``
Variants: ``quick`` (a short run for smoke tests).
"""

from dpo_jax.config import apply_variants, base_config, short_run


def get_config(arg: str = ""):
    config = base_config()
    config.task = "reward"
    config.train.steps = 200
    config.train.eval_every = 100
    config.train.checkpoint_every = 100
    return apply_variants(config, arg, {"quick": short_run(60)}, "configs/reward_synthetic.py")
