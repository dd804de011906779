"""The ``online`` block of ``config.task='online_dpo'`` (``dpo_jax/online.py``): its schema and
its reader, declared beside the task and called once by ``config.read_config``
(``dpo_jax.tasks.TASK_BLOCKS``), so the task reads ``rc.task_block``.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from dpo_jax.eval_config import add_sampling_fields, read_sampling
from dpo_jax.sampling import SamplingConfig


def default_online_config() -> ml_collections.ConfigDict:
    """The ``online`` block (``configs/online_dpo.py`` adds it to ``base_config``)."""
    c = ml_collections.ConfigDict()
    # reward of a completion: 'synthetic' (the synthetic task's true reward) or a task='reward'
    # run's workdir; any other reward is passed as the task's reward_fn
    c.reward = "synthetic"
    c.samples_per_prompt = 2  # k completions per prompt; best and worst form the pair
    # 0 = online (sample from the current policy every step); n >= 1 = iterative DPO: n rounds
    # of train.steps / n steps, each sampling from the policy as it was when the round began
    c.iterations = 0
    # the sampler (temperature > 0: pairs need distinct completions)
    add_sampling_fields(c, max_new_tokens=16)
    # jsonl rows with prompt_ids or prompt (text or messages: tokenised as training prompts);
    # '' = the prompts of data's train split
    c.prompt_file = ""
    c.max_prompts = 0  # cap on training prompts (0 = all)
    c.prompt_width = 0  # padded prompt length P (0 = the longest prompt)
    return c


@dataclasses.dataclass(frozen=True)
class OnlineConfig:
    """The ``online`` block, read once (:func:`read_online`)."""

    reward: str
    samples_per_prompt: int
    iterations: int
    sampling: SamplingConfig
    prompt_file: str
    max_prompts: int
    prompt_width: int


def read_online(config: ml_collections.ConfigDict) -> OnlineConfig:
    """The frozen ``online`` block (a config without one: :func:`default_online_config`); the
    sampler stops at ``online.stop_ids``, or when empty at the data's end tokens
    (``dpo_jax.data.prompts.stop_ids``). Raises ValueError for k < 2, a greedy sampler (every
    completion of a prompt would be the same: all ties), negative iterations or a number of
    rounds that does not divide ``train.steps``."""
    o = config.get("online") or default_online_config()
    k, n, steps = int(o.samples_per_prompt), int(o.iterations), int(config.train.steps)
    if k < 2:
        raise ValueError(f"online.samples_per_prompt={k}: a pair needs at least 2 completions")
    if float(o.temperature) <= 0.0:
        raise ValueError(f"online.temperature={o.temperature}: greedy sampling gives every "
                         "prompt identical completions (all ties); use a temperature > 0")
    if n < 0 or (n and steps % n):
        raise ValueError(f"online.iterations={n}: must be 0 (online) or a divisor of "
                         f"train.steps={steps} (equal rounds)")
    return OnlineConfig(
        reward=str(o.reward), samples_per_prompt=k, iterations=n,
        sampling=read_sampling(o, config),
        prompt_file=str(o.prompt_file), max_prompts=int(o.max_prompts),
        prompt_width=int(o.prompt_width))
