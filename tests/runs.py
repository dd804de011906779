"""Task-level test helpers: tiny configs of every task, a run's final parameters and logs.

End-to-end tests call a task's ``train_and_evaluate(config, workdir)`` on these configs; step
tests use ``tests/helpers.py`` instead.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from dpo_jax import checkpoint as ckpt_lib
from dpo_jax.config import base_config
from dpo_jax.models import Model, model_config_from
from dpo_jax.ppo.config import default_ppo_config
from dpo_jax.reward_model import RewardModel
from dpo_jax.sft import add_sft_config
from dpo_jax.tasks import get_task


def tiny(c, steps: int = 4, batch_size: int = 16, **train):
    """A 1-layer d_model-32 model, ``steps`` of ``batch_size``, synchronous checkpoints only at
    the end, a metrics record every step, small synthetic splits."""
    c.model.overrides.n_layer = 1
    c.model.overrides.d_model = 32
    c.model.overrides.d_ff = 64
    c.data.synthetic.num_train = 128
    c.data.synthetic.num_eval = 32
    c.data.buckets = "32"
    c.train.steps = steps
    c.train.batch_size = batch_size
    c.train.eval_batch_size = 16
    c.train.eval_every = 0
    c.train.log_every = 1
    c.train.checkpoint_every = 0
    c.train.async_checkpointing = False
    for k, v in train.items():
        c.train[k] = v
    return c


def dpo_config(**train):
    return tiny(base_config(), **train)


def sft_config(**train):
    return tiny(add_sft_config(base_config()), **train)


def reward_config(**train):
    c = tiny(base_config(), **train)
    c.task = "reward"
    return c


def ppo_config(**train):
    c = tiny(base_config(), **train)
    c.task = "ppo"
    c.ppo = default_ppo_config()
    c.ppo.reward = "synthetic"
    c.ppo.max_new_tokens = 4
    c.ppo.max_prompts = 64
    c.ppo.epochs = 1
    c.ppo.minibatches = 2
    c.ppo.adaptive_kl = True
    c.ppo.target_kl = 0.5
    c.ppo.kl_horizon = 64
    c.optim.max_grad_norm = 1.0
    return c


CONFIGS = {"dpo": dpo_config, "sft": sft_config, "reward": reward_config, "ppo": ppo_config}


def run(config, workdir, **kwargs) -> dict:
    """The task ``config.task`` names, run in ``workdir``; its summary."""
    return get_task(config.task)(config, str(workdir), **kwargs)


def final_params(config, workdir, step: int | None = None):
    """The parameters of ``workdir``'s newest (or ``step``'s) checkpoint, on one device."""
    cfg = model_config_from(config.model)
    model = RewardModel(Model(cfg)) if config.task in ("reward", "ppo") else Model(cfg)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one),
                        model.abstract_params())
    return ckpt_lib.restore_params(str(workdir), like, step=step)


def records(workdir) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def assert_same_params(a, b) -> None:
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def without_timing(recs: list[dict]) -> list[dict]:
    """Metric records without wall-clock fields (they differ between any two runs)."""
    drop = ("tokens_per_s", "iteration_s")
    return [{k: v for k, v in r.items() if k not in drop} for r in recs]

