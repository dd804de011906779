"""The DPO objective for rankings of K responses: the Plackett-Luce model (Rafailov et al. 2023,
Appendix A.3, Eq. 18 of the arXiv version).

With implicit rewards ``r_k = beta * (pi_k - ref_k)`` of responses ranked best (k = 0) to worst,

    loss = -sum_{k} log [ exp(r_k) / sum_{j >= k} exp(r_j) ]

over the first ``pl_top_k`` positions (all of them by default). Each stage's term is computed as
``-log sigma(z_k)``, ``z_k = r_k - log sum_{j > k} exp(r_j)`` (the last stage contributes 0), with
the log-sum-exp taken around the largest competitor, so that K = 2 is DPO's ``sigmoid`` loss to
the last bit (``z_0 = beta * (c_0 - c_1)``, exactly the expression ``sigmoid`` evaluates) and
saturated rewards give finite losses and gradients.

Ties: a rank is the *competition rank* (the number of strictly better responses; tied
responses share the lowest rank). Tied responses are handled with Breslow's approximation of
the tied Plackett-Luce (Cox partial) likelihood: each response of a tie group is one stage
whose competitors are every response ranked no better than it, the other members of its group
included. Without ties this is Eq. A.3; a tie group at the bottom is pulled towards equal
rewards instead of being given an arbitrary order.

Masked slots (``mask == 0``: prompts with fewer than K responses) are neither stages nor
competitors: a prompt with k responses has exactly the loss of the same k responses alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpo_jax.losses.spec import LossConfig, Option, register
from dpo_jax.losses.terms import (Array, LossOutput, SequenceStats, _Ctx, _dpo_rewards,
                                  _log_ratios, _sg, weighted_mean)


def competition_ranks(mask_BK: Array, ranks_BK: Array | None) -> Array:
    """int32 [B, K]: the given ranks, or slot order 0..K-1 when None; masked slots get K."""
    B, K = mask_BK.shape
    if ranks_BK is None:
        ranks_BK = jnp.broadcast_to(jnp.arange(K, dtype=jnp.int32), (B, K))
    return jnp.where(mask_BK > 0, ranks_BK.astype(jnp.int32), K)


def plackett_luce(logratios_BK: Array, mask_BK: Array, beta: float, top_k: int | None = None,
                  ranks_BK: Array | None = None) -> Array:
    """Per-prompt Plackett-Luce DPO loss, f32 [B] (see the module doc).

    ``logratios_BK``: ``pi - ref`` summed log-probs of the K response slots (f32 [B, K], slots
    ordered best to worst); ``mask_BK``: 1 for a real response, 0 for a padded slot;
    ``ranks_BK``: competition ranks (0 = best; equal values = a tie), None = slot order;
    ``top_k``: only responses of rank < top_k are stages (the top-k truncated model), None = all.
    A prompt with fewer than two real responses has loss 0."""
    c_BK = jnp.asarray(logratios_BK, jnp.float32)
    valid_BK = jnp.asarray(mask_BK) > 0
    rank_BK = competition_ranks(mask_BK, ranks_BK)
    K = c_BK.shape[1]
    same_KK = jnp.eye(K, dtype=bool)
    # rivals_BKJ[b, k, j]: response j competes at stage k (ranked no better, not k itself).
    rivals_BKJ = (valid_BK[:, None, :] & valid_BK[:, :, None]
                  & (rank_BK[:, None, :] >= rank_BK[:, :, None]) & ~same_KK[None])
    has_rival_BK = jnp.any(rivals_BKJ, axis=-1)
    c_J = c_BK[:, None, :]
    top_BK = jnp.max(jnp.where(rivals_BKJ, c_J, -jnp.inf), axis=-1)
    top_BK = jnp.where(has_rival_BK, top_BK, 0.0)
    # exp(beta * (c_j - top)) <= 1 for rivals; non-rivals read 0 (no inf reaches the gradient).
    gap_BKJ = jnp.where(rivals_BKJ, c_J - top_BK[..., None], 0.0)
    rest_BK = jnp.sum(jnp.where(rivals_BKJ, jnp.exp(beta * gap_BKJ), 0.0), axis=-1)
    z_BK = beta * (c_BK - top_BK) - jnp.log(jnp.where(has_rival_BK, rest_BK, 1.0))
    stage_BK = has_rival_BK & valid_BK
    if top_k is not None:
        stage_BK = stage_BK & (rank_BK < top_k)
    return jnp.sum(jnp.where(stage_BK, -jax.nn.log_sigmoid(z_BK), 0.0), axis=-1)


def adjacent_accuracy(rewards_BK: Array, mask_BK: Array, ranks_BK: Array | None = None) -> Array:
    """f32 [B]: the fraction of adjacent ranked pairs (slot k and k+1, both real, k+1 strictly
    worse) whose rewards are ordered as ranked (strictly); 0 for a prompt without such a pair."""
    rank_BK = competition_ranks(mask_BK, ranks_BK)
    valid_BK = jnp.asarray(mask_BK) > 0
    pair_Bk = valid_BK[:, :-1] & valid_BK[:, 1:] & (rank_BK[:, 1:] > rank_BK[:, :-1])
    right_Bk = pair_Bk & (rewards_BK[:, :-1] > rewards_BK[:, 1:])
    n_B = jnp.sum(pair_Bk, axis=-1)
    return jnp.sum(right_Bk, axis=-1) / jnp.maximum(n_B, 1)


def last_real(x_BK: Array, mask_BK: Array) -> Array:
    """[B]: x at each row's last real slot (slot 0 when none is real)."""
    K = mask_BK.shape[1]
    last_B = jnp.max(jnp.where(jnp.asarray(mask_BK) > 0, jnp.arange(K), 0), axis=-1)
    return jnp.take_along_axis(x_BK, last_B[:, None], axis=-1)[:, 0]


def ranked_stats(logps_BK: Array, lengths_BK: Array, mask_BK: Array) -> SequenceStats:
    """The best (slot 0) and worst (last real slot) responses as a pair's ``SequenceStats``:
    what the step logs as ``logps/chosen`` and ``logps/rejected`` for ranked lists."""
    return SequenceStats(chosen_logps=logps_BK[:, 0], rejected_logps=last_real(logps_BK, mask_BK),
                         chosen_lengths=lengths_BK[:, 0],
                         rejected_lengths=last_real(lengths_BK, mask_BK))


def listwise_loss(cfg: LossConfig, policy_logps_BK: Array, reference_logps_BK: Array,
                  mask_BK: Array, ranks_BK: Array | None = None,
                  weights: Array | None = None) -> LossOutput:
    """``loss.name='plackett_luce'`` on one (global) batch of B ranked lists.

    ``*_logps_BK``: summed response log-probs, f32 [B, K], slots best to worst; ``mask_BK``,
    ``ranks_BK``: see :func:`plackett_luce`; ``weights`` [B]: prompt weights (0 = padding).
    Rewards: ``chosen_rewards`` the best response's ``beta * log-ratio``, ``rejected_rewards``
    the worst real one's. Extras (prompt-weighted means): ``rewards/accuracies`` (replaces the
    pair accuracy) the fraction of adjacent ranked pairs ordered correctly per prompt
    (:func:`adjacent_accuracy`), and ``rewards/rank_<k>`` the mean reward at rank slot k over
    the prompts that have a k-th response. Raises ValueError for a loss list other than
    ``plackett_luce`` alone."""
    if cfg.names != ("plackett_luce",):
        raise ValueError(f"ranked lists (data.format='ranked') train loss.name='plackett_luce' "
                         f"alone; got {list(cfg.names)}")
    f32 = jnp.float32
    mask_BK = jnp.asarray(mask_BK, f32)
    c_BK = jnp.asarray(policy_logps_BK, f32) - jnp.asarray(reference_logps_BK, f32)
    B, K = c_BK.shape
    w_B = jnp.ones((B,), f32) if weights is None else jnp.asarray(weights, f32)
    losses_B = plackett_luce(c_BK, mask_BK, cfg.beta, cfg.pl_top_k, ranks_BK)
    r_BK = _sg(cfg.beta * c_BK)
    extras = {"rewards/accuracies": weighted_mean(adjacent_accuracy(r_BK, mask_BK, ranks_BK),
                                                  w_B)}
    for k in range(K):
        wk = w_B * mask_BK[:, k]
        extras[f"rewards/rank_{k}"] = jnp.sum(wk * r_BK[:, k]) / jnp.maximum(jnp.sum(wk), 1e-12)
    return LossOutput(losses=losses_B, chosen_rewards=r_BK[:, 0],
                      rejected_rewards=last_real(r_BK, mask_BK), extras=extras)


@register("plackett_luce", kind="list", options=(
    Option("pl_top_k", int, None, "only the first k ranks are Plackett-Luce stages (the top-k "
           "truncated ranking likelihood)", low=1, default_doc="None (all ranks)"),))
def _plackett_luce_pair(c: _Ctx) -> LossOutput:
    # Rafailov et al. 2023, Appendix A.3 with K = 2 (a ranking of two is a pair): equals
    # `sigmoid` to the last bit; ranked lists of K responses go through listwise_loss.
    c_w, c_l = _log_ratios(c)
    losses = plackett_luce(jnp.stack([c_w, c_l], axis=1), jnp.ones((c_w.shape[0], 2)),
                           c.cfg.beta, c.cfg.pl_top_k)
    return LossOutput(losses, *_dpo_rewards(c), {})
