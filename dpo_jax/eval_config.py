"""The ``eval`` block of a run config: samples and win rates during evaluation, for any task
(``dpo_jax/evaluation.py`` draws them). Declared here, read once by :func:`read_eval` (called
by ``config.read_config``), so neither the config layer nor the evaluator imports the other.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from dpo_jax.data.config import read_run_data
from dpo_jax.data.prompts import stop_ids
from dpo_jax.sampling import SamplingConfig


def add_sampling_fields(c: ml_collections.ConfigDict, max_new_tokens: int) -> None:
    """The sampler's fields of a block that samples (``eval``, ``online``, ``ppo``), read by
    :func:`read_sampling`, added to ``c`` with their defaults."""
    c.max_new_tokens = max_new_tokens  # completion tokens per sample
    c.temperature = 1.0  # sampler temperature
    c.top_k = 0  # keep the k most likely tokens (0 = all)
    c.top_p = 1.0  # nucleus mass kept
    # token ids that end a sample: () = the data's end tokens (data.tokenizer's chat-template turn
    # end and EOS, the tokens responses are trained to end with; a tokenised source's own end
    # tokens: the synthetic task's 0); or e.g. (2, 7)
    c.stop_ids = ()
    c.pad_id = 0  # pad id of prompts and sampled rows


def read_sampling(block, config: ml_collections.ConfigDict, stops: bool = True
                  ) -> SamplingConfig:
    """The ``SamplingConfig`` of a block's sampler fields (:func:`add_sampling_fields`) in run
    config ``config``: the sampler stops at the block's ``stop_ids``, or when empty at the
    data's end tokens (``data.prompts.stop_ids``); ``stops`` False: at none (nothing samples,
    so the data is not read)."""
    return SamplingConfig(
        max_new_tokens=int(block.max_new_tokens), temperature=float(block.temperature),
        top_k=int(block.top_k), top_p=float(block.top_p), pad_id=int(block.pad_id),
        stop_ids=stop_ids(read_run_data(config), block.get("stop_ids", ())) if stops else ())


def default_eval_config() -> ml_collections.ConfigDict:
    """The ``eval`` block: the policy's completions of held-out eval prompts in
    WORKDIR/samples.jsonl and TensorBoard (off by default)."""
    c = ml_collections.ConfigDict()
    c.sample_every = 0  # steps between sample points, a multiple of train.eval_every (0 = off)
    c.sample_prompts = 16  # held-out prompts sampled (drawn once from the eval split)
    c.seed = 0  # which prompts, and the sampler's key (the same at every sample point)
    add_sampling_fields(c, max_new_tokens=32)  # temperature 0: greedy
    # judge for samples/reward and eval/win_rate (vs the reference, ties half): '' = none,
    # 'synthetic' (the synthetic task's true reward) or a task='reward' run's workdir
    c.judge = ""
    return c


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The ``eval`` block, read once (:func:`read_eval`)."""

    sample_every: int  # 0 = no samples
    sample_prompts: int
    seed: int
    sampling: SamplingConfig
    judge: str  # '' = none, 'synthetic', or a task='reward' run's workdir


def read_eval(config: ml_collections.ConfigDict) -> EvalConfig:
    """The frozen ``eval`` block of run config ``config``; a config without one samples
    nothing. The sampler stops at ``eval.stop_ids``, or when empty at the data's end tokens
    (``data.prompts.stop_ids``). Raises ValueError when ``eval.sample_every`` is not a multiple
    of ``train.eval_every`` (samples are drawn at evaluation points) or a count is negative."""
    e = config.get("eval") or default_eval_config()
    every, n = int(e.sample_every or 0), int(e.sample_prompts)
    eval_every = int(config.train.eval_every or 0)
    if every < 0 or n < 1:
        raise ValueError(f"eval.sample_every={every} must be >= 0 and eval.sample_prompts={n} "
                         ">= 1")
    if every and (not eval_every or every % eval_every):
        raise ValueError(f"eval.sample_every={every} must be a multiple of train.eval_every="
                         f"{eval_every} (samples are drawn when the run evaluates); set "
                         "train.eval_every to a divisor of it")
    return EvalConfig(
        sample_every=every, sample_prompts=n, seed=int(e.seed),
        sampling=read_sampling(e, config, stops=bool(every)),
        judge=str(e.judge))
