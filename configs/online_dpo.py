"""Online DPO on the synthetic task: pairs sampled from the policy every step, judged by the
task's true reward (``dpo_jax/online.py``; docs/online.md).

    python -m dpo_jax.main --config=configs/online_dpo.py --workdir=/tmp/online
    python -m dpo_jax.main --config=configs/online_dpo.py:iterative --workdir=/tmp/iterative
    python -m dpo_jax.main --config=configs/online_dpo.py:quick --workdir=/tmp/online_quick

Variants: ``iterative`` (4 rounds of 50 steps, each sampling from the policy as the round began),
``quick`` (a 1-layer model and 100 steps; tests/test_online.py).
"""

from dpo_jax.config import apply_variants, base_config
from dpo_jax.online import default_online_config


def quick(c):
    c.model.overrides.update(n_layer=1, d_model=64, d_ff=128)
    c.data.synthetic.update(num_train=128, num_eval=32)
    c.data.buckets = "32"
    c.online.max_new_tokens = 8
    c.optim.lr = 3e-3
    c.train.update(steps=100, batch_size=16, eval_batch_size=16, eval_every=100,
                   checkpoint_every=100)
    c.eval.update(sample_every=100, sample_prompts=16, max_new_tokens=8)


def iterative(c):
    c.online.iterations = 4


def get_config(arg: str = ""):
    c = base_config()
    c.update(task="online_dpo", online=default_online_config())
    c.online.update(samples_per_prompt=4, max_new_tokens=12)
    c.optim.lr = 1e-3
    c.train.steps = 200  # the true reward saturates: past ~200 steps nearly every pair is a tie
    c.eval.sample_every = 100  # samples and eval/win_rate against the reference, judged by
    c.eval.max_new_tokens = 12  # the same true reward
    c.eval.judge = "synthetic"
    return apply_variants(c, arg, {"quick": quick, "iterative": iterative}, "configs/online_dpo.py")
