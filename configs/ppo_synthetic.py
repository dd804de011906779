"""PPO on the synthetic task's prompts.

``--config=configs/ppo_synthetic.py --config.ppo.reward_model=runs/rm`` optimises a trained
reward model (see configs/reward_synthetic.py); variant ``gt`` is PPO-GT (the task's true
reward: fraction of liked content tokens). Variants: ``gt``, ``quick``; e.g. ``:gt,quick``.
"""

from dpo_jax.config import apply_variants, base_config, short_run
from dpo_jax.ppo.config import default_ppo_config


def get_config(arg: str = ""):
    config = base_config()
    config.task = "ppo"
    config.ppo = default_ppo_config()
    config.ppo.update(max_new_tokens=16, init_kl_coef=0.05, target_kl=6.0)
    config.optim.update(lr=3e-4, warmup_steps=0, max_grad_norm=1.0)
    # batch_size: rollouts per PPO iteration; steps: PPO iterations
    config.train.update(batch_size=64, eval_batch_size=128, steps=100, eval_every=50,
                        checkpoint_every=50)
    config.data.synthetic.num_eval = 256
    def ground_truth(c):
        c.ppo.reward = "synthetic"

    return apply_variants(config, arg, {"gt": ground_truth, "quick": short_run(20)},
                          "configs/ppo_synthetic.py")
