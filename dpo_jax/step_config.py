"""``StepConfig``: how a preference step computes log-probs and treats its reference.

Its own module so that the config layer (``dpo_jax/config.py`` builds it in ``read_config``)
does not import the step; ``dpo_jax.step`` re-exports it.
"""

from __future__ import annotations

import dataclasses

from dpo_jax.logprobs import LogprobConfig


@dataclasses.dataclass(frozen=True)
class StepConfig:
    grad_accum: int = 1  # micro-batches per update
    logprobs: LogprobConfig = LogprobConfig()
    # forward-only passes (reference log-probs, evaluation): no backward, so no remat trade-off
    # and their best tiling can differ (None given: as `logprobs`). Must keep its scored_only.
    forward_logprobs: LogprobConfig | None = None
    # TR-DPO (Gorbatovski et al. 2024): after every `ref_sync_every`-th update (0 = never) the
    # reference becomes ref_mixup_alpha * policy + (1 - ref_mixup_alpha) * reference.
    ref_sync_every: int = 0
    ref_mixup_alpha: float = 0.6
    # The reference is the policy's starting point (same parameters in the same dtype: no
    # init.reference / ref_hf_path / ref_param_dtype of its own, no LoRA). Then at step 0 the
    # reference log-probs ARE the policy's (its forward is skipped, stored ones are not read),
    # so the first step's rewards are exact zeros and no pair counts as accurate, as in TRL,
    # instead of round-off between two differently compiled passes over the same parameters.
    reference_is_initial_policy: bool = False
    # Per-pair diagnostics (train.diagnostics; dpo_jax/diagnostics.py): log-prob changes from
    # the reference, margin histogram, CHES scores from the policy forward's hidden states.
    # Metrics only: the loss and its gradient are the same with or without them.
    diagnostics: bool = False

    def __post_init__(self):
        if self.forward_logprobs is None:
            object.__setattr__(self, "forward_logprobs", self.logprobs)
        f = self.forward_logprobs
        if f.scored_only != self.logprobs.scored_only:
            raise ValueError("forward_logprobs.scored_only must equal logprobs.scored_only")
        if self.ref_sync_every < 0 or not 0.0 < self.ref_mixup_alpha <= 1.0:
            raise ValueError(f"ref_sync_every={self.ref_sync_every} must be >= 0 and "
                             f"ref_mixup_alpha={self.ref_mixup_alpha} in (0, 1]")
