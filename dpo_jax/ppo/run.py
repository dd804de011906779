"""``config.task='ppo'``: the RLHF baseline (PPO with a learned reward, or PPO-GT with a
ground-truth reward) on the shared loop.

One loop step is one PPO iteration: sample completions for a prompt batch from the policy
(jitted, sharded), score them with the reward function, then the jitted PPO update
(``dpo_jax/ppo/step.py``) and the adaptive KL controller. The controller's coefficient is saved
as its own checkpoint item. The reference is the policy's initial decoder unless
``init.reference`` / ``model.ref_hf_path`` names another.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from dpo_jax import data as data_lib
from dpo_jax import eval_metrics
from dpo_jax import evaluation
from dpo_jax import loop
from dpo_jax import sharding as shard_lib
from dpo_jax import state as state_lib
from dpo_jax.config import read_config
from dpo_jax.data.prompts import PromptStream, load_prompts
from dpo_jax.models import Model
from dpo_jax.ppo import core
from dpo_jax.ppo.config import PPOSettings
from dpo_jax.ppo.rewards import RewardFn, build_reward
from dpo_jax.ppo.step import make_ppo_eval_step, make_ppo_step
from dpo_jax.reward_model import RewardModel, init_params
from dpo_jax.sampling import generate
from dpo_jax.workdir import RunDir, opens_workdir

EVAL_SEED_OFFSET = 1_000_003  # eval rollouts use seed + this, train rollouts seed + 1


@opens_workdir
def train_and_evaluate(config: ml_collections.ConfigDict, run: RunDir, *,
                       reward_fn: RewardFn | None = None,
                       interrupt_after: int | None = None) -> dict[str, Any]:
    """Train a PPO run; called as ``train_and_evaluate(config, workdir)``, returns its summary.
    ``reward_fn(samples) -> [B]`` replaces the reward the config names (``ppo.reward``), e.g. an
    experiment's ground truth."""
    rc = read_config(config)
    settings: PPOSettings = rc.task_block
    ppo = settings.update
    model = RewardModel(Model(rc.model))
    # The schedule counts optimizer updates: epochs * minibatches per PPO iteration.
    setup = state_lib.setup(rc, model, updates=rc.train.steps * ppo.epochs * ppo.minibatches,
                            init=init_params)
    mesh = setup.mesh
    ref = state_lib.init_reference(model.decoder, setup.shardings["decoder"], rc.param_sources,
                                   setup.trainable["decoder"])
    state = setup._replace(frozen=state_lib.Frozen(reference=ref)).initial_state()
    reward_fn = reward_fn if reward_fn is not None else build_reward(rc, mesh=mesh)
    kl = core.KLController(settings.init_kl_coef, settings.target_kl, settings.kl_horizon)

    data = {}
    sizes = {"train": rc.train.batch_size, "eval": rc.train.eval_batch_size}
    for split in rc.train.splits:
        prompts = load_prompts(split, prompt_file=settings.prompt_file,
                               eval_prompt_file=settings.eval_prompt_file,
                               max_prompts=settings.max_prompts, data_cfg=rc.data)
        if prompts:
            data[split] = PromptStream(
                prompts, train=split == "train", global_batch_size=sizes[split],
                width=settings.prompt_width or max(len(x) for x in prompts),
                seed=rc.seed, pad_id=settings.sampling.pad_id,
                process_index=jax.process_index(), process_count=jax.process_count())

    update = loop.jit_train_step(
        make_ppo_step(model, setup.tx, setup.schedule, ppo, rc.train.on_nonfinite,
                      rc.optim.grad_accum), state)
    eval_metrics_of = jax.jit(make_ppo_eval_step(model, ppo.max_new_tokens), static_argnums=3)
    cfg = settings.sampling
    sample = jax.jit(lambda params, ids, lengths, rng: generate(
        model.decoder, params["decoder"], ids, lengths, rng, cfg))

    def rollout(params, prompts_np, rng):
        prompts = data_lib.to_global(prompts_np, shard_lib.batch_shardings(prompts_np, mesh))
        samples = sample(params, prompts["prompt_ids"], prompts["prompt_lengths"], rng)
        return {"tokens": samples.tokens_BT, "completion_mask": samples.completion_mask_BT,
                "prompt_lengths": prompts["prompt_lengths"], "scores": reward_fn(samples),
                "weight": prompts["weight"]}, samples.stopped_B

    train_rng = jax.random.key(rc.seed + 1)

    def step_fn(state, prompts_np):
        t0 = time.time()
        batch, stopped_B = rollout(state.trainable, prompts_np,
                                   jax.random.fold_in(train_rng, state.step))
        batch["kl_coef"] = jnp.float32(kl.value)
        state, metrics = update(state, batch, None)
        metrics = loop.host_floats(metrics)
        # rollouts that ran to max_new_tokens without a stop token (ppo.stop_ids)
        metrics["env/truncated"] = float(1.0 - np.mean(evaluation.to_host(stopped_B)))
        kl.update(metrics["objective/kl"], int(batch["tokens"].shape[0]))
        metrics["iteration_s"] = time.time() - t0
        logging.log_every_n(logging.INFO, "ppo: reward=%.4f kl=%.4f beta=%.4f", 10,
                            metrics["env/reward_mean"], metrics["objective/kl"], kl.value)
        return state, metrics

    def evaluate(state):
        rng = jax.random.key(rc.seed + EVAL_SEED_OFFSET)
        batches = (rollout(state.trainable, p, jax.random.fold_in(rng, i))[0]
                   for i, p in enumerate(data["eval"]))
        return eval_metrics.reduce(
            lambda b: eval_metrics_of(state.trainable, state.frozen, b, None), batches)

    samples = evaluation.sample_evaluator(
        rc, workdir=run.path, model=model.decoder, mesh=mesh,
        reference_params=state.frozen.reference,
        prompts=data["eval"].prompts if "eval" in data else None,
        judge=None if rc.eval.judge else reward_fn, params_of=lambda s: s.trainable["decoder"])
    return loop.train(
        run, state, cfg=rc.train, mesh=mesh, step_fn=step_fn, train_data=data["train"],
        evaluate=evaluation.with_samples(evaluate if "eval" in data else None, samples),
        host_states={"kl_controller": kl},
        count_tokens=lambda b: b["prompt_ids"].size + b["prompt_ids"].shape[0] * ppo.max_new_tokens,
        report=lambda: {"kl_coef": kl.value,
                        "data": {k: s.stats for k, s in data.items()}},
        interrupt_after=interrupt_after)
