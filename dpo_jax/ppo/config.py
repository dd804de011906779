"""``config.ppo``: PPO's fields. Where a field notes "trl: x", x is the classic trl
PPOTrainer default (Ziegler et al. 2019's recipe); the synthetic configs change what they need."""

from __future__ import annotations

import dataclasses

import ml_collections

from dpo_jax.eval_config import add_sampling_fields, read_sampling
from dpo_jax.sampling import SamplingConfig


@dataclasses.dataclass(frozen=True)
class PPOConfig:
    """What the PPO update (``ppo/step.py``) reads of the ``ppo`` block (and the run seed)."""

    max_new_tokens: int
    epochs: int = 4  # passes over each rollout batch
    minibatches: int = 4  # updates per pass
    gamma: float = 1.0
    lam: float = 0.95
    clip: float = 0.2  # policy ratio clip
    vf_clip: float = 0.2  # value clip (around the rollout-time value)
    vf_coef: float = 0.1
    whiten_advantages: bool = True
    # True: the value head reads stop_gradient(hidden states), so the value loss cannot move the
    # shared trunk (a linear value probe on the policy's features). False: trl's shared trunk.
    detach_value_head: bool = False
    seed: int = 0  # minibatch shuffling (folded with the step)


def default_ppo_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # reward source: 'model' (a reward run's workdir in reward_model), 'synthetic' (the synthetic
    # task's true reward: PPO-GT); an experiment passes any other reward as the task's reward_fn
    # (the name here then only labels it, e.g. 'ground_truth')
    c.reward = "model"
    c.reward_model = ""  # workdir of a task='reward' run
    # prompts: jsonl rows with prompt_ids or prompt (text or messages: tokenised as training
    # prompts); '' = the prompts of config.data's split
    c.prompt_file = ""
    c.eval_prompt_file = ""  # held-out prompts ('' with prompt_file set: no eval)
    c.max_prompts = 0  # cap on prompts per split (0 = all)
    c.prompt_width = 0  # padded prompt length P (0 = the longest prompt)
    # sampling: max_new_tokens completion tokens per rollout (T = P + this); top_k 0 (trl's
    # recipe samples from the full distribution)
    add_sampling_fields(c, max_new_tokens=16)
    # KL penalty against the frozen reference
    c.init_kl_coef = 0.2  # beta at the start (trl: 0.2)
    c.adaptive_kl = True  # Ziegler et al.'s proportional controller
    c.target_kl = 6.0  # target sequence KL in nats (trl: 6; the paper's IMDb sweep: 3, 6, 9, 12)
    c.kl_horizon = 10000  # controller horizon in episodes (trl: 10000)
    # PPO update
    c.epochs = 4  # passes over each rollout batch (trl: 4)
    c.minibatches = 4  # updates per pass (minibatch = rollout batch / this)
    c.gamma = 1.0  # discount (trl: 1)
    c.lam = 0.95  # GAE lambda (trl: 0.95)
    c.clip = 0.2  # policy ratio clip range (trl: 0.2)
    c.vf_clip = 0.2  # value clip range (trl: 0.2)
    c.vf_coef = 0.1  # value loss weight (trl: 0.1)
    c.whiten_advantages = True
    # Value head on stop_gradient(trunk features): the value loss cannot reach the policy's
    # trunk. Off = trl's shared trunk. On IMDb PPO-GT with a growing KL coefficient the returns
    # (-beta * KL) grew to ~-43, the value loss to ~42,000, and with grad clipping its gradient
    # swamped the policy's; see docs/rlhf.md.
    c.detach_value_head = False
    return c


@dataclasses.dataclass(frozen=True)
class PPOSettings:
    """The ``ppo`` block, read once (:func:`read_ppo`)."""

    update: PPOConfig
    sampling: SamplingConfig
    reward: str  # 'model', a name of ppo.rewards.TRUE_REWARDS, or a label of a passed reward_fn
    reward_model: str  # a task='reward' run's workdir (reward='model')
    init_kl_coef: float
    target_kl: float | None  # None: a fixed KL coefficient
    kl_horizon: int
    prompt_file: str
    eval_prompt_file: str
    max_prompts: int
    prompt_width: int  # 0 = the longest prompt


def read_ppo(config: ml_collections.ConfigDict) -> PPOSettings:
    """The frozen view of ``config.ppo`` (and the run seed) that the PPO task consumes (a config
    without the block: :func:`default_ppo_config`); rollouts stop at ``ppo.stop_ids``, or when
    empty at the data's end tokens (``dpo_jax.data.prompts.stop_ids``)."""
    p = config.get("ppo") or default_ppo_config()
    return PPOSettings(
        reward=str(p.reward), reward_model=str(p.reward_model),
        update=PPOConfig(max_new_tokens=int(p.max_new_tokens), epochs=int(p.epochs),
                         minibatches=int(p.minibatches), gamma=float(p.gamma), lam=float(p.lam),
                         clip=float(p.clip), vf_clip=float(p.vf_clip), vf_coef=float(p.vf_coef),
                         whiten_advantages=bool(p.whiten_advantages),
                         detach_value_head=bool(p.detach_value_head), seed=int(config.seed)),
        sampling=read_sampling(p, config),
        init_kl_coef=float(p.init_kl_coef),
        target_kl=float(p.target_kl) if p.adaptive_kl else None, kl_horizon=int(p.kl_horizon),
        prompt_file=p.prompt_file, eval_prompt_file=p.eval_prompt_file,
        max_prompts=int(p.max_prompts), prompt_width=int(p.prompt_width))
