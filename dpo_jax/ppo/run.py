"""``config.task='ppo'``: the RLHF baseline as a :class:`~dpo_jax.train.Run` subclass.

Each iteration: sample completions for a prompt batch from the policy (jitted, sharded), score
them with the configured reward (learned reward model, or a ground-truth reward for PPO-GT),
then run the jitted PPO update (``dpo_jax.ppo.step``). The mesh, parameter shardings, optimizer,
checkpoints (policy + value head, optimizer state, prompt position and KL coefficient) and the
metric sinks are the Run's. The reference is the policy's initial decoder unless
``init.reference`` names another run.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from dpo_jax import data as data_lib
from dpo_jax import sharding as shard_lib
from dpo_jax import train as train_lib
from dpo_jax.data.prompts import PromptStream, load_prompts
from dpo_jax.ppo import core
from dpo_jax.ppo.rewards import RewardFn, build_reward
from dpo_jax.ppo.step import PPOConfig, make_ppo_eval_step, make_ppo_step
from dpo_jax.reward_model import RewardModel, init_head_model_state
from dpo_jax.sampling import SamplingConfig, generate
from dpo_jax.optim import OptimConfig, make_optimizer
from dpo_jax.state import TrainState


def ppo_config(config) -> PPOConfig:
    p = config.ppo
    return PPOConfig(max_new_tokens=int(p.max_new_tokens), epochs=int(p.epochs),
                     minibatches=int(p.minibatches), gamma=float(p.gamma), lam=float(p.lam),
                     clip=float(p.clip), vf_clip=float(p.vf_clip), vf_coef=float(p.vf_coef),
                     whiten_advantages=bool(p.whiten_advantages),
                     detach_value_head=bool(p.get("detach_value_head", False)),
                     seed=int(config.seed))


def sampling_config(config, eos_id: int, pad_id: int) -> SamplingConfig:
    p = config.ppo
    return SamplingConfig(max_new_tokens=int(p.max_new_tokens), temperature=float(p.temperature),
                          top_k=int(p.top_k), top_p=float(p.top_p), eos_id=eos_id, pad_id=pad_id)


class PPORun(train_lib.Run):
    """PPO on prompts; ``reward_fn`` overrides the configured reward source (tests, PPO-GT with
    a custom function): everything else is shared between PPO and PPO-GT."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str,
                 reward_fn: RewardFn | None = None):
        super().__init__(config, workdir)
        self.reward_fn = reward_fn if reward_fn is not None else build_reward(config, mesh=self.mesh)

    # ------------------------------------------------------------------- task hooks
    def setup_task(self) -> None:
        c = self.config
        self.ppo_cfg = ppo_config(c)
        if int(c.optim.grad_accum) != 1:
            raise ValueError("task 'ppo' does not accumulate gradients; set optim.grad_accum=1")
        # The schedule counts optimizer updates: epochs * minibatches per PPO iteration.
        updates = self.total_steps * self.ppo_cfg.epochs * self.ppo_cfg.minibatches
        self.tx, self.schedule = make_optimizer(OptimConfig.from_config(c.optim), updates)
        self.model = RewardModel(self.model)
        self.eos_id = int(c.ppo.eos_id)
        self.pad_id = int(c.ppo.pad_id)
        self.sampling_cfg = sampling_config(c, self.eos_id, self.pad_id)
        target = float(c.ppo.target_kl) if c.ppo.adaptive_kl else None
        self.kl_controller = core.KLController(float(c.ppo.init_kl_coef), target,
                                               int(c.ppo.kl_horizon))
        decoder = self.model.decoder
        cfg = self.sampling_cfg
        self._rollout = jax.jit(
            lambda params, ids, lengths, rng: generate(decoder, params["decoder"], ids, lengths,
                                                       rng, cfg))

    def needs_reference(self) -> bool:
        return True

    def make_train_step(self):
        return make_ppo_step(self.model, self.tx, self.ppo_cfg)

    def make_eval_step(self):
        return make_ppo_eval_step(self.model, self.ppo_cfg.max_new_tokens)

    def build_data(self, split: str, global_batch_size: int):
        prompts = load_prompts(self.config, split)
        if not prompts:
            return None
        width = int(self.config.ppo.prompt_width) or max(len(x) for x in prompts)
        return PromptStream(prompts, train=split == "train", global_batch_size=global_batch_size,
                            width=width, seed=int(self.config.seed), pad_id=self.pad_id,
                            process_index=jax.process_index(), process_count=jax.process_count())

    def _init_state(self) -> TrainState:
        c = self.config
        params, opt_state = init_head_model_state(self, c.init.policy or None)
        if c.init.reference or c.model.get("ref_hf_path"):
            ref = train_lib._init_params(self.model.decoder, c.init.reference or None,
                                         c.model.get("ref_hf_path"),
                                         self.param_shardings["decoder"], jax.random.key(int(c.seed)))
        else:
            ref = jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                          out_shardings=self.param_shardings["decoder"])(params["decoder"])
        step = jax.device_put(jnp.zeros((), jnp.int32), shard_lib.replicated(self.mesh))
        return TrainState(step=step, params=params, ref_params=ref, opt_state=opt_state)

    # ------------------------------------------------------------------------ rollouts
    def rollout(self, prompts_np: dict[str, np.ndarray], rng: jax.Array):
        """Samples and their reward scores for one host-local prompt batch."""
        prompts = data_lib.to_global(prompts_np, shard_lib.batch_shardings(prompts_np, self.mesh))
        samples = self._rollout(self.state.params, prompts["prompt_ids"],
                                prompts["prompt_lengths"], rng)
        batch = {"tokens": samples.tokens_BT, "completion_mask": samples.completion_mask_BT,
                 "prompt_lengths": prompts["prompt_lengths"], "scores": self.reward_fn(samples)}
        return batch, prompts["weight"]

    def evaluate(self) -> dict[str, float]:
        """Mean reward and sequence KL to the reference of samples on held-out prompts."""
        totals: dict[str, float] = {}
        rng = jax.random.key(int(self.config.seed) + 1_000_003)
        for i, prompts_np in enumerate(self.eval_data):
            batch, weight = self.rollout(prompts_np, jax.random.fold_in(rng, i))
            batch["weight"] = weight
            sums = jax.device_get(self._eval_step(self.state.params, self.state.ref_params, batch, None))
            for k, v in sums.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        weight = max(totals.pop("weight", 0.0), 1e-9)
        return {k: v / weight for k, v in totals.items()}

    def train(self) -> dict[str, Any]:
        t0 = time.time()
        log_every = max(1, int(self.config.train.log_every))
        eval_every = int(self.config.train.eval_every or 0) if self.eval_data is not None else 0
        rng = jax.random.key(int(self.config.seed) + 1)
        first_train: dict[str, float] = {}
        last_train: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        compile_s = None
        kl_coef = self.kl_controller.value
        for step in range(self.start_step, self.total_steps):
            t_step = time.time()
            batch, _ = self.rollout(next(self.train_data), jax.random.fold_in(rng, step))
            batch["kl_coef"] = jnp.float32(self.kl_controller.value)
            self.state, metrics = self._train_step(self.state, batch, None)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            compile_s = compile_s if compile_s is not None else time.time() - t_step
            kl_coef = self.kl_controller.update(metrics["objective/kl"], int(batch["tokens"].shape[0]))
            metrics["iteration_s"] = time.time() - t_step
            last_train = metrics
            first_train = first_train or metrics
            done = step + 1
            if done % log_every == 0 or done == self.total_steps:
                self.writer.write(done, metrics)
                if jax.process_index() == 0:
                    logging.info("ppo step %d/%d: reward=%.4f kl=%.4f beta=%.4f", done,
                                 self.total_steps, metrics["env/reward_mean"],
                                 metrics["objective/kl"], kl_coef)
            if eval_every and (done % eval_every == 0 or done == self.total_steps):
                last_eval = self.evaluate()
                self.writer.write(done, last_eval, prefix="eval/")
            if done == self.total_steps or (self.checkpoint_every and done % self.checkpoint_every == 0):
                self.checkpointer.save(done, self.state.params, self.state.opt_state,
                                       self.train_data.state_dict())
        self.checkpointer.close()
        self.writer.close()
        summary = {"steps": self.total_steps, "resumed_from": self.start_step,
                   "wall_s": round(time.time() - t0, 1),
                   "compile_s": None if compile_s is None else round(compile_s, 1),
                   "first_train": first_train, "final_train": last_train, "final_eval": last_eval,
                   "kl_coef": kl_coef, "data": self.train_data.stats}
        if jax.process_index() == 0:
            with open(os.path.join(self.workdir, "summary.json"), "w") as f:
                json.dump(summary, f, indent=2)
        return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    return PPORun(config, workdir).train()
