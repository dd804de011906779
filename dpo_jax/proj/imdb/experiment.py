"""What every stage of the IMDb pipeline shares: its config, workdir, tokenizer, ground-truth
reward and decoder, and how a training run's config and a saved checkpoint are derived from them.

The tokenizer, reward and decoder are built once, on first use: later stages of a rerun whose
early stages are cached never build what they do not need (e.g. a cached frontier needs no
model), and one ``Model`` instance keeps the jitted sampler from recompiling.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import ml_collections

from dpo_jax import checkpoint as ckpt_lib
from dpo_jax import sharding as shard_lib
from dpo_jax import state as state_lib
from dpo_jax.data.tokenize import load_tokenizer
from dpo_jax.models import Model, model_config_from
from dpo_jax.proj.imdb.text import load_imdb
from dpo_jax.reward_model import RewardModel
from dpo_jax.sampling import score_tokens
from dpo_jax.proj.imdb.sentiment import HubSentimentReward, SentimentReward
from dpo_jax.ppo.rewards import model_reward
from dpo_jax.ppo.config import default_ppo_config
from dpo_jax.online import default_online_config


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One pipeline run: the experiment config (``config.imdb`` is its block) and the workdir
    every stage reads from and writes to."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path

    @property
    def imdb(self) -> ml_collections.ConfigDict:
        return self.config.imdb

    @property
    def tokenizer_dir(self) -> str:
        """``imdb.tokenizer`` when set, else the IMDb BPE the ``tokenizer`` stage writes."""
        return self.imdb.tokenizer or str(self.workdir / "tokenizer")

    @functools.cached_property
    def tokenizer(self):
        return load_tokenizer(self.tokenizer_dir)

    @functools.cached_property
    def reward(self):
        """The ground-truth reward ``(prompts, completions) -> float32 [N]``: the hub classifier
        (``imdb.hub_reward``), a saved offline classifier (``imdb.reward_dir``), or the one the
        ``reward`` stage fitted in the workdir."""
        if self.imdb.hub_reward:
            return HubSentimentReward(self.imdb.hub_reward)
        return SentimentReward.load(self.imdb.reward_dir or self.workdir / "reward")

    @functools.cached_property
    def model(self) -> Model:
        """The decoder of every run (SFT, DPO, baselines, PPO policy, reward-model trunk)."""
        return Model(model_config_from(self.run_config("sft").model))

    @functools.cached_property
    def score(self):
        """Jitted ``(params, tokens [B, T], segments [B, T]) -> per-token log-probs [B, T]``."""
        return jax.jit(lambda p, t, s: score_tokens(self.model, p, t, s))

    @functools.cached_property
    def proxy_reward(self):
        """The learned reward model (the ``reward_model`` stage's run) as the reward function
        PPO optimised: ``ppo.rewards.model_reward``, which scores prompt + completion + EOS as
        the model was trained."""
        params = self.restore(self.workdir / "reward_model", head=True)
        return model_reward(RewardModel(self.model), params,
                            stop_ids=int(self.tokenizer.eos_token_id))

    def texts(self, split: str, limit: int) -> list[str]:
        """Cleaned reviews of ``split`` (the first ``limit``; 0 = all)."""
        return load_imdb(self.imdb.data_dir, split, limit=int(limit) or None)[0]

    def run_config(self, task: str, **sections: dict) -> ml_collections.ConfigDict:
        """A copy of the experiment config for one training run of ``task``, less the
        experiment's own ``imdb`` block: the model's vocabulary taken from the tokenizer
        (unless ``model.hf_path`` gives a whole model) and ``sections`` (block name ->
        {field: value}) set on top."""
        c = self.config.copy_and_resolve_references()
        c.unlock()
        # The run's own workdir remembers this config and refuses a rerun that changes it: the
        # experiment's block is not the run's (a new beta or PPO setting must not stop a
        # finished SFT stage from being reused), and the library never reads it.
        del c["imdb"]
        c.task = task
        if task == "ppo":
            c.ppo = default_ppo_config()
        if task == "online_dpo":
            c.online = default_online_config()
        if not c.model.hf_path:
            c.model.overrides.vocab_size = len(self.tokenizer)
        for section, values in sections.items():
            for k, v in values.items():
                c[section][k] = v
        return c

    def restore(self, run_dir: pathlib.Path, step: int | None = None, *, head: bool = False):
        """Parameters of a run's checkpoint (the latest when ``step`` is None), sharded as the
        experiment's mesh says. ``head``: the run saved ``{"decoder", "value_head"}`` (PPO, the
        reward model) and that whole tree is returned."""
        tree = RewardModel(self.model) if head else self.model
        mesh_cfg = self.config.mesh
        mesh = shard_lib.make_mesh(dict(mesh_cfg.shape))
        rules = tuple(tuple(r) for r in mesh_cfg.rules)
        like = state_lib.abstract(tree.abstract_params(),
                                  state_lib.param_shardings(tree, mesh, rules))
        return ckpt_lib.restore_params(str(run_dir), like, step)

    def checkpoint_steps(self, run_dir: pathlib.Path) -> list[int]:
        """The steps of a run's finished checkpoints, oldest first."""
        manager = ckpt_lib.Checkpointer(str(run_dir / "checkpoints"), async_save=False)
        try:
            return manager.steps()
        finally:
            manager.close()
