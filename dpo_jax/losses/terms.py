"""The terms every preference loss is built from: sequence statistics, the loss output, log-ratios,
f-divergence scores, implicit rewards, weighted means and the numeric caps.

Notation: see ``dpo_jax/losses/core.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from dpo_jax.losses.spec import LossConfig, Option, readers

Array = jax.Array

# Largest per-token average log-prob ORPO feeds to log(1 - p): keeps the odds of p -> 1 finite
# (log-odds capped near log(1e6) ~ 13.8) so loss and gradient stay finite when a response is
# (numerically) certain.
ORPO_MAX_AVG_LOGP = -1e-6
# Cap on the exponent of the f-DPO scores (forward KL e^{-r}, alpha-divergence e^{(alpha-1) r}):
# TRL's float32/bfloat16 cap for the alpha-divergence, applied here to forward KL as well.
F_SCORE_MAX_EXPONENT = 80.0
# Bound on |f-DPO score|: keeps beta-scaled score differences, IPO's square and their gradients
# finite in float32 for every alpha and beta (e^80 / |alpha - 1| alone can overflow them).
F_SCORE_MAX = 1e15
# Bound on IPO's residual (its square <= 1e34 fits in float32, with room for a batch sum); only
# reached with f-divergence scores near F_SCORE_MAX.
_IPO_MAX_RESIDUAL = 1e17
# Cap on the exponent of DiscoPOP's exponential branch (exp(80) ~ 5.5e34 fits in f32); it is only
# reached for discopop_tau >= 1 with very negative margins.
_DISCOPOP_MAX_EXPONENT = 80.0


@struct.dataclass
class SequenceStats:
    """Per-pair sequence statistics of one model; everything a preference loss needs.

    chosen_logps / rejected_logps: f32 [B], SUM of response-token log-probs.
    chosen_lengths / rejected_lengths: f32 [B], number of scored response tokens (a padding pair
    may carry 0; losses clip lengths to >= 1 so it stays finite). With LD-DPO (loss.ld_alpha)
    the log-prob sums are already length-desensitised; lengths stay token counts.
    """

    chosen_logps: Array
    rejected_logps: Array
    chosen_lengths: Array
    rejected_lengths: Array
    # WPO only (loss.use_weighting): per-token mean of log(p_t / sum_v p_v^2) under this model,
    # f32 [B], no gradient (logprobs.sequence_logps(with_wpo=True) sums divided by lengths).
    chosen_wpo_logps: Array | None = None
    rejected_wpo_logps: Array | None = None


@struct.dataclass
class LossOutput:
    """Per-pair losses (unweighted; the caller takes the pair-weighted mean) and diagnostics.

    chosen_rewards / rejected_rewards: the implicit rewards the selected paper defines
    (beta * log-ratio for DPO-style losses), with stop_gradient. extras: scalar diagnostics,
    pair-weighted means over the (global) batch, e.g. ``nll_loss``, ``log_odds_ratio``, and
    ``loss/<name>`` for each component of a combined loss.
    """

    losses: Array
    chosen_rewards: Array
    rejected_rewards: Array
    extras: dict[str, Array]


class _Ctx(NamedTuple):
    """Inputs shared by all loss functions (f32, lengths clipped to >= 1)."""

    cfg: LossConfig
    pi_w: Array
    pi_l: Array
    ref_w: Array | None
    ref_l: Array | None
    len_w: Array
    len_l: Array
    weights: Array  # pair weights, 0 for padding pairs


_Part = LossOutput  # what one loss component returns (preference_loss combines them)


def weighted_mean(x: Array, weights: Array | None = None) -> Array:
    """Pair-weighted mean; the loss reduction train/eval steps use (padding pairs weigh 0)."""
    if weights is None:
        return jnp.mean(x)
    weights = weights.astype(x.dtype)
    return jnp.sum(x * weights) / jnp.maximum(jnp.sum(weights), 1e-12)


def _sg(x: Array) -> Array:
    return jax.lax.stop_gradient(x)


def _log_ratios(c: _Ctx) -> tuple[Array, Array]:
    """(c_w, c_l) on summed log-probs; needs the reference."""
    return c.pi_w - c.ref_w, c.pi_l - c.ref_l


def f_divergence_score(r: Array, f_divergence_type: str, alpha: float = 0.5) -> Array:
    """The f-DPO score of a log-ratio ``r = log pi/ref`` (Wang et al. 2023, "Beyond Reverse KL":
    f'(u) at u = e^r, shifted so the score of r = 0 is 0).

    reverse_kl: r (DPO); forward_kl: 1 - e^{-r}; js_divergence: ln 2 + log sigma(r);
    alpha_divergence: (e^{(alpha-1) r} - 1) / (alpha - 1) (r when |alpha - 1| < 1e-6, its limit).
    Exponents are capped at F_SCORE_MAX_EXPONENT and the score is clipped to +-F_SCORE_MAX, so
    loss and gradient stay finite in float32 (zero gradient where a cap binds). The additive
    constants (1, ln 2, 1/(alpha-1)) cancel in every difference of scores; TRL drops them.
    """
    if f_divergence_type == "reverse_kl":
        return r
    if f_divergence_type == "forward_kl":
        score = -jnp.expm1(jnp.minimum(-r, F_SCORE_MAX_EXPONENT))
    elif f_divergence_type == "js_divergence":
        score = jnp.log(2.0) + jax.nn.log_sigmoid(r)
    elif f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return r
        score = jnp.expm1(jnp.minimum((alpha - 1.0) * r, F_SCORE_MAX_EXPONENT)) / (alpha - 1.0)
    else:
        raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}")
    return jnp.clip(score, -F_SCORE_MAX, F_SCORE_MAX)


F_DIVERGENCE_TYPES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence",
                                       "alpha_divergence")


def _check_f_divergence_type(cfg: LossConfig, raw: dict) -> None:
    """As in TRL, a divergence other than reverse_kl applies only to the losses built on the
    chosen and rejected log-ratios alone: every other selected loss refuses it."""
    f_type, users = cfg.f_divergence_type, readers("f_divergence_type")
    others = [n for n in cfg.names if n not in users]
    if f_type != "reverse_kl" and others:
        raise ValueError(
            f"loss.f_divergence_type={f_type!r} does not apply to loss(es) {others} (as in "
            f"TRL, only {', '.join(sorted(users))} replace their log-ratios by "
            "the f-DPO score); drop those losses or use f_divergence_type='reverse_kl'")


def _check_f_alpha(cfg: LossConfig, raw: dict) -> None:
    if raw.get("f_alpha_divergence_coef") is not None and (
            cfg.f_divergence_type != "alpha_divergence"):
        raise ValueError(
            f"loss.f_alpha_divergence_coef={raw['f_alpha_divergence_coef']!r} is set but "
            f"unused with f_divergence_type={cfg.f_divergence_type!r}; it is read only with "
            "f_divergence_type='alpha_divergence'")


# The options of the losses that read their log-ratios through f_divergence_score (declare
# both to get f-DPO); their readers are losses.F_DIVERGENCE_LOSSES.
F_DIVERGENCE_OPTIONS: tuple[Option, ...] = (
    Option("f_divergence_type", str, "reverse_kl", "f-DPO score replacing each log-ratio (TRL's "
           "name and values); every other selected loss refuses a value other than reverse_kl",
           choices=F_DIVERGENCE_TYPES, check=_check_f_divergence_type),
    Option("f_alpha_divergence_coef", float, 0.5, "α of f_divergence_type='alpha_divergence' "
           "(any finite value; α = 1 is reverse KL); read only with alpha_divergence",
           check=_check_f_alpha),
)


def _scores(c: _Ctx, c_w: Array, c_l: Array) -> tuple[Array, Array]:
    """The log-ratios (c_w, c_l) as the losses declaring F_DIVERGENCE_OPTIONS read them: replaced by
    their f-DPO scores under cfg.f_divergence_type (identity for reverse_kl)."""
    f, alpha = c.cfg.f_divergence_type, c.cfg.f_alpha_divergence_coef
    return f_divergence_score(c_w, f, alpha), f_divergence_score(c_l, f, alpha)


def _score_margin(c: _Ctx) -> Array:
    """h with each log-ratio replaced by its f-DPO score: s(c_w) - s(c_l)."""
    s_w, s_l = _scores(c, *_log_ratios(c))
    return s_w - s_l


def _dpo_rewards(c: _Ctx) -> tuple[Array, Array]:
    c_w, c_l = _log_ratios(c)
    return _sg(c.cfg.beta * c_w), _sg(c.cfg.beta * c_l)


def _smoothed_logistic(z: Array, eps: float) -> Array:
    """cDPO form -(1-eps) log sigma(z) - eps log sigma(-z) (Mitchell 2023 note; TRL sigmoid)."""
    loss = -jax.nn.log_sigmoid(z)
    if eps:
        loss = (1.0 - eps) * loss - eps * jax.nn.log_sigmoid(-z)
    return loss


def _nll(c: _Ctx) -> Array:
    """Per-pair NLL of the chosen response, averaged over its tokens: -pi_w / |y_w|."""
    return -c.pi_w / c.len_w


def _padding_last_order(x: Array, weights: Array) -> Array:
    """Permutation sorting x ascending with padding pairs (weight 0) after all real pairs.

    Real pairs then occupy ranks 0..n-1 exactly as if the padding were absent, which is what
    keeps padded pairs from changing real pairs' AOT losses.
    """
    is_pad = (weights <= 0).astype(jnp.int32)
    return jnp.lexsort((x, is_pad))  # last key is primary: real (0) before padding (1)
