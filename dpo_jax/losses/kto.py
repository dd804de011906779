"""KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
Eq. 7-8) on unpaired feedback: one completion per example with a desirable / undesirable label.

With ``c = pi - ref`` the summed log-ratio of the example's completion,

    desirable:    desirable_weight   * (1 - sigma(beta * (c - z0)))
    undesirable:  undesirable_weight * (1 - sigma(beta * (z0 - c)))

and the reference point ``z0`` the batch estimate of KL(pi || pi_ref) as TRL's ``KTOTrainer``
computes it: the mean over the batch of ``pi(y'|x) - ref(y'|x)`` summed over the tokens of a
*mismatched* completion ``y'`` (example i's prompt with the completion of example i - 1 of the
same batch, cyclically: TRL's ``_get_kl_dataset`` +1 offset, so the mismatched completions are
the batch's own completions), clamped at 0, under stop_gradient. TRL averages per device and
then over devices (``gather_for_metrics(kl).mean()``); here the mean is over the whole global
batch, which is the same number for equal per-device batches and independent of the mesh.
Padding examples (weight 0) are left out of the mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpo_jax.losses.spec import LossConfig, LossSpec, Option, declare
from dpo_jax.losses.terms import Array, LossOutput, SequenceStats, _sg


def kto_reference_point(policy_kl_logps_B: Array, reference_kl_logps_B: Array,
                        weights_B: Array) -> Array:
    """z0, f32 scalar: weighted batch mean of the mismatched completions' log-ratios, clamped at
    0, no gradient."""
    w = jnp.asarray(weights_B, jnp.float32)
    kl_B = jnp.asarray(policy_kl_logps_B, jnp.float32) - jnp.asarray(reference_kl_logps_B,
                                                                      jnp.float32)
    return _sg(jnp.maximum(jnp.sum(w * kl_B) / jnp.maximum(jnp.sum(w), 1e-12), 0.0))


def kto_losses(logratios_B: Array, desirable_B: Array, z0: Array, beta: float,
               desirable_weight: float, undesirable_weight: float) -> Array:
    """Per-example KTO loss, f32 [B] (module doc); ``desirable_B`` 1 / 0 (or bool)."""
    c = jnp.asarray(logratios_B, jnp.float32)
    good = jnp.asarray(desirable_B) > 0
    return jnp.where(good, desirable_weight * (1.0 - jax.nn.sigmoid(beta * (c - z0))),
                     undesirable_weight * (1.0 - jax.nn.sigmoid(beta * (z0 - c))))


def _label_mean(x_B: Array, w_B: Array) -> Array:
    return jnp.sum(w_B * x_B) / jnp.maximum(jnp.sum(w_B), 1e-12)


def kto_loss(cfg: LossConfig, policy: SequenceStats, reference: SequenceStats,
             desirable_B: Array, weights: Array | None = None) -> LossOutput:
    """``loss.name='kto'`` on one (global) batch of B unpaired examples.

    ``policy`` / ``reference``: ``chosen_logps`` the example's completion, ``rejected_logps``
    its mismatched (KL) completion (summed f32 [B]); ``desirable_B`` the labels; ``weights``
    [B] example weights (0 = padding). ``chosen_rewards`` = ``rejected_rewards`` = ``beta * c``
    of the completion; extras (batch means as TRL logs them): ``kl`` (z0), ``rewards/chosen``
    and ``rewards/rejected`` (mean reward of the desirable / undesirable examples),
    ``rewards/margins`` (their difference), ``rewards/accuracies`` (fraction of examples on
    their label's side of z0: ``c > z0`` when desirable, ``c < z0`` when not),
    ``logps/chosen`` / ``logps/rejected`` (mean completion log-prob per label) and
    ``count/desirable`` (fraction of desirable examples). Raises ValueError for a loss list
    other than ``kto`` alone or without a reference."""
    if cfg.names != ("kto",):
        raise ValueError(f"unpaired examples (data.format='unpaired') train loss.name='kto' "
                         f"alone; got {list(cfg.names)}")
    if reference is None:
        raise ValueError("loss 'kto' needs reference log-probs, got reference=None")
    f32 = jnp.float32
    pi = jnp.asarray(policy.chosen_logps, f32)
    w_B = jnp.ones_like(pi) if weights is None else jnp.asarray(weights, f32)
    good_B = (jnp.asarray(desirable_B) > 0).astype(f32)
    z0 = kto_reference_point(policy.rejected_logps, reference.rejected_logps, w_B)
    c_B = pi - jnp.asarray(reference.chosen_logps, f32)
    losses_B = kto_losses(c_B, good_B, z0, cfg.beta, cfg.desirable_weight,
                          cfg.undesirable_weight)
    r_B = _sg(cfg.beta * c_B)
    wd, wu = w_B * good_B, w_B * (1.0 - good_B)
    right_B = jnp.where(good_B > 0, c_B > z0, c_B < z0).astype(f32)
    extras = {
        "kl": z0,
        "rewards/chosen": _label_mean(r_B, wd),
        "rewards/rejected": _label_mean(r_B, wu),
        "rewards/accuracies": _label_mean(_sg(right_B), w_B),
        "logps/chosen": _label_mean(_sg(pi), wd),
        "logps/rejected": _label_mean(_sg(pi), wu),
        "count/desirable": _label_mean(good_B, w_B),
    }
    extras["rewards/margins"] = extras["rewards/chosen"] - extras["rewards/rejected"]
    return LossOutput(losses=losses_B, chosen_rewards=r_B, rejected_rewards=r_B, extras=extras)


# KTO reads no pairs (fn=None): the step calls kto_loss on data.format='unpaired' batches.
declare(LossSpec("kto", fn=None, kind="unpaired", batch_statistic=True, options=(
    Option("desirable_weight", float, 1.0, "λ_D: weight of the desirable examples' losses "
           "(TRL KTOConfig)", low=0.0, low_open=True),
    Option("undesirable_weight", float, 1.0, "λ_U: weight of the undesirable examples' losses "
           "(TRL KTOConfig)", low=0.0, low_open=True))))
