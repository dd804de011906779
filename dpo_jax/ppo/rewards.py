"""Reward sources for PPO: ``reward_fn(samples) -> float32 [B]`` on device.

PPO (learned reward model) and PPO-GT (ground-truth reward) differ only in which of these the
run passes to the same rollout/update code:

* :func:`model_reward` -- a trained :class:`~dpo_jax.reward_model.RewardModel` (Stiennon et al.);
* :func:`synthetic_reward` -- the synthetic task's ``true_reward`` (fraction of liked content
  tokens under the prompt's topic), jittable;
* :func:`text_reward` -- any host-side text reward ``fn(prompts, completions)`` over decoded
  prompt and completion (an experiment's ground truth, e.g. the IMDb project's sentiment
  classifier, which its pipeline passes to PPO as ``reward_fn``).

:func:`build_reward` builds the first two from a run's ``ppo`` block (``TRUE_REWARDS`` names
the ground truths a config can name, shared with the eval judge and online DPO's reward); a
text reward is always passed in by
its caller, so the library imports no experiment.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.data.synthetic import SyntheticTask
from dpo_jax.sampling import Samples
from dpo_jax import state as state_lib
from dpo_jax.models import Model, model_config_from
from dpo_jax.reward_model import RewardModel, restore_reward_model

RewardFn = Callable[[Samples], jax.Array]


def _stop_tuple(stop_ids) -> tuple[int, ...]:
    return (int(stop_ids),) if isinstance(stop_ids, int) else tuple(int(t) for t in stop_ids)


def with_final_eos(tokens_BT: jax.Array, mask_BT: jax.Array, stop_ids):
    """Rows ``[B, T + 1]`` whose completion ends in a stop token: ``stop_ids[0]`` (an int: that
    id) is written after the last generated token of every row that stopped at the length bound
    (rows already ending in any of ``stop_ids``, and rows with no generated token, are
    unchanged). A reward model trained by this codebase reads its head at the end token the
    data pipeline appends to every response; scoring a truncated rollout at a content token
    instead would ask it for a reward at a position it never learnt."""
    stops = _stop_tuple(stop_ids)
    eos_id = stops[0]
    B, T = tokens_BT.shape
    tokens = jnp.concatenate([tokens_BT, jnp.full((B, 1), eos_id, tokens_BT.dtype)], axis=1)
    mask = jnp.concatenate([mask_BT, jnp.zeros((B, 1), mask_BT.dtype)], axis=1)
    t = jnp.arange(T + 1, dtype=jnp.int32)
    has = jnp.any(mask > 0, axis=1)
    last = jnp.max(jnp.where(mask > 0, t[None, :], -1), axis=1)
    final = jnp.take_along_axis(tokens, jnp.maximum(last, 0)[:, None], axis=1)[:, 0]
    ends_eos = jnp.any(final[:, None] == jnp.asarray(stops, tokens.dtype)[None, :], axis=1)
    add = (has & ~ends_eos)[:, None] & (t[None, :] == last[:, None] + 1)
    return (jnp.where(add, jnp.asarray(eos_id, tokens.dtype), tokens),
            jnp.where(add, jnp.ones((), mask.dtype), mask))


def model_reward(model, params, stop_ids=None) -> RewardFn:
    """Scores from a reward model (params are passed to one jitted function, not baked in).
    With ``stop_ids`` (an id or a sequence), rollouts cut at the length bound are scored with
    ``stop_ids[0]`` appended (:func:`with_final_eos`), as the reward model saw every response
    in training."""

    def _score(params, tokens, mask):
        if stop_ids is not None and len(_stop_tuple(stop_ids)):
            tokens, mask = with_final_eos(tokens, mask, stop_ids)
        return model.score(params, tokens, mask)

    score = jax.jit(_score)

    def reward(samples: Samples) -> jax.Array:
        return score(params, samples.tokens_BT, samples.completion_mask_BT)

    return reward


def synthetic_true_reward(task: SyntheticTask, tokens_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """Vectorised ``dpo_jax.data.synthetic.true_reward``: the topic is each row's first token;
    EOS/topic tokens in the completion are ignored; 0 when the completion has no content."""
    topic = tokens_BT[:, :1]
    content = (mask_BT > 0) & (tokens_BT >= task.first_content)
    liked = content & (tokens_BT % task.num_topics == topic - 1)
    n = jnp.sum(content, axis=1)
    return jnp.where(n > 0, jnp.sum(liked, axis=1) / jnp.maximum(n, 1), 0.0).astype(jnp.float32)


def synthetic_reward(task: SyntheticTask) -> RewardFn:
    fn = jax.jit(lambda t, m: synthetic_true_reward(task, t, m))
    return lambda samples: fn(samples.tokens_BT, samples.completion_mask_BT)


def to_host(x: jax.Array) -> np.ndarray:
    """A global array as one numpy array on every process."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def text_reward(fn: Callable[[list[str], list[str]], np.ndarray],
                decode: Callable[[list[int]], str]) -> RewardFn:
    """A host text reward ``fn(prompts, completions)`` over decoded samples (EOS dropped)."""

    def reward(samples: Samples) -> jax.Array:
        tokens, mask = to_host(samples.tokens_BT), to_host(samples.completion_mask_BT)
        prompts, completions = [], []
        for row, m in zip(tokens, mask):
            start = int(np.argmax(m > 0)) if m.any() else len(row)
            gen = row[m > 0]
            prompts.append(decode(row[:start].tolist()))
            completions.append(decode(gen.tolist()))
        out = np.asarray(fn(prompts, completions), np.float32)
        sharding = samples.lengths_B.sharding
        if jax.process_count() > 1:
            return jax.make_array_from_callback(out.shape, sharding, lambda i: out[i])
        return jax.device_put(out, sharding)

    return reward


# Ground-truth rewards a config names (eval.judge, online.reward, ppo.reward): name ->
# fn(data: DataConfig) -> RewardFn. 'synthetic': the synthetic task's true reward.
TRUE_REWARDS: dict[str, Callable[[Any], RewardFn]] = {
    "synthetic": lambda data: synthetic_reward(SyntheticTask.from_config(data.synthetic)),
}


def build_reward(rc, *, mesh=None) -> RewardFn:
    """The reward a PPO run names (``rc`` a ``config.RunConfig``; its ``task_block`` the
    ``PPOSettings``): ``ppo.reward`` 'model' (``ppo.reward_model``, a reward run's workdir) or a
    name of :data:`TRUE_REWARDS` ('synthetic').

    Raises ValueError for any other name: other rewards (an experiment's ground truth) are
    passed to PPO as a function, ``ppo.run.train_and_evaluate(config, workdir, reward_fn=...)``.
    """
    p = rc.task_block
    if p.reward in TRUE_REWARDS:
        return TRUE_REWARDS[p.reward](rc.data)
    if p.reward == "model":
        if not p.reward_model:
            raise ValueError("ppo.reward='model' needs ppo.reward_model (a reward run's workdir)")
        return reward_model_from_run(p.reward_model, mesh, rc.mesh_rules, p.sampling.stop_ids)
    raise ValueError(f"ppo.reward={p.reward!r}: expected 'model' or one of "
                     f"{sorted(TRUE_REWARDS)}; pass any other reward as reward_fn to "
                     "dpo_jax.ppo.run.train_and_evaluate")


def reward_model_from_run(run_dir: str, mesh, rules, stop_ids) -> RewardFn:
    """The reward function of a ``task='reward'`` run: its model rebuilt from the run's
    config.json, its newest checkpoint restored in ``mesh``'s shardings under ``rules``.
    Raises ValueError when ``run_dir`` is empty or holds no config.json."""
    import json
    import os

    import ml_collections

    if not run_dir or not os.path.exists(os.path.join(run_dir, "config.json")):
        raise ValueError(f"{run_dir!r} is not a task='reward' run's workdir (no config.json)")
    with open(os.path.join(run_dir, "config.json")) as f:
        rm_config = ml_collections.ConfigDict(json.load(f))
    model = RewardModel(Model(model_config_from(rm_config.model)))
    shardings = state_lib.param_shardings(model, mesh, rules)
    return model_reward(model, restore_reward_model(run_dir, model, shardings), stop_ids=stop_ids)
