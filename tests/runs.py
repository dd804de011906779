"""Task-level test helpers: tiny configs of every task, a run's final parameters and logs.

End-to-end tests call a task's ``train_and_evaluate(config, workdir)`` on these configs; step
tests use ``tests/helpers.py`` instead.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from dpo_jax import checkpoint as ckpt_lib
from dpo_jax import loop
from dpo_jax.config import base_config
from dpo_jax.models import Model, model_config_from
from dpo_jax.ppo.config import default_ppo_config
from dpo_jax.reward_model import RewardModel
from dpo_jax.sft import add_sft_config
from dpo_jax.tasks import get_task


def tiny(c, steps: int = 4, batch_size: int = 16, **train):
    """A 1-layer d_model-32 model, ``steps`` of ``batch_size``, synchronous checkpoints only at
    the end, a metrics record every step, small synthetic splits."""
    c.update_from_flattened_dict({
        "model.overrides.n_layer": 1, "model.overrides.d_model": 32, "model.overrides.d_ff": 64,
        "data.synthetic.num_train": 128, "data.synthetic.num_eval": 32, "data.buckets": "32"})
    c.train.update({"steps": steps, "batch_size": batch_size, "eval_batch_size": 16,
                    "eval_every": 0, "log_every": 1, "checkpoint_every": 0,
                    "async_checkpointing": False, **train})
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
    c.ppo.update(reward="synthetic", max_new_tokens=4, max_prompts=64, epochs=1, minibatches=2,
                 adaptive_kl=True, target_kl=0.5, kl_horizon=64)
    c.optim.max_grad_norm = 1.0
    return c


CONFIGS = {"dpo": dpo_config, "sft": sft_config, "reward": reward_config, "ppo": ppo_config}


def run(config, workdir, **kwargs) -> dict:
    """The task ``config.task`` names, run in ``workdir``; its summary."""
    return get_task(config.task)(config, str(workdir), **kwargs)


def cut_and_resume(config, workdir, interrupt_after: int, **kwargs) -> dict:
    """``config`` run in ``workdir`` until it is interrupted after step ``interrupt_after``
    (``loop.Interrupted``, asserted), then run again there; the rerun's summary."""
    with pytest.raises(loop.Interrupted):
        run(config, workdir, interrupt_after=interrupt_after, **kwargs)
    return run(config, workdir, **kwargs)


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


def assert_same_run(config, got, want) -> list[dict]:
    """The runs of ``config`` in workdirs ``got`` and ``want`` ended with bit-identical
    parameters and the same metric log (wall-clock fields aside); ``want``'s records without
    those fields."""
    assert_same_params(final_params(config, got), final_params(config, want))
    want_records = without_timing(records(want))
    assert without_timing(records(got)) == want_records
    return want_records


def resume_matches_full_run(config, workdir, interrupt_after: int, resumed_from: int):
    """``config`` run uninterrupted in ``workdir/'full'`` and, in ``workdir/'cut'``,
    interrupted after step ``interrupt_after`` and rerun: the rerun resumed from step
    ``resumed_from`` and ended as the uninterrupted run did (:func:`assert_same_run`).
    ``(full run's summary, rerun's summary, full run's records without wall-clock fields)``."""
    full = run(config, workdir / "full")
    summary = cut_and_resume(config, workdir / "cut", interrupt_after)
    assert summary["resumed_from"] == resumed_from
    return full, summary, assert_same_run(config, workdir / "cut", workdir / "full")
