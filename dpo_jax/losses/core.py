"""Preference losses as pure, jittable functions of per-sequence log-prob statistics.

Notation used in every comment below (all per pair i of the batch):

* ``pi_w, pi_l``  policy log-probs of chosen / rejected response, SUMMED over response tokens;
* ``ref_w, ref_l`` the same for the reference model;
* ``|y_w|, |y_l|`` number of scored response tokens;
* ``c_w = pi_w - ref_w``, ``c_l = pi_l - ref_l``  (per-response log-ratios);
* ``h = c_w - c_l``  (the DPO "logits": policy log-ratio minus reference log-ratio);
* ``sigma`` the logistic function, ``log sigma`` computed as ``jax.nn.log_sigmoid``.

Summed vs averaged log-probs is a per-loss choice: DPO-family losses use sums (the sequence
likelihood in the Bradley-Terry model), IPO (default), SimPO, ORPO, sft and the NLL terms use
per-token averages ``pi / |y|`` as their papers do.

Batch statistics (bco_pair's reward mean, aot / aot_unpaired sorting) are taken over the whole
arrays passed in. Under ``jax.jit`` with data-sharded inputs those arrays are the GLOBAL batch
(XLA inserts the collectives), so the loss does not depend on the number of devices.
Padding pairs (``weights == 0``) are excluded from those statistics, so they never change a real
pair's loss; their own entries in ``losses`` are finite garbage meant to be multiplied by 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpo_jax.losses.spec import KIND_DATA, LossConfig, Option, needs_reference, register, spec
from dpo_jax.losses.terms import (
    F_DIVERGENCE_OPTIONS,
    Array,
    LossOutput,
    ORPO_MAX_AVG_LOGP,
    SequenceStats,
    _Ctx,
    _DISCOPOP_MAX_EXPONENT,
    _IPO_MAX_RESIDUAL,
    _Part,
    _dpo_rewards,
    _log_ratios,
    _nll,
    _padding_last_order,
    _score_margin,
    _scores,
    _sg,
    _smoothed_logistic,
    weighted_mean,
)


# ----------------------------------------------------------------------------- shared options

DEFAULT_EXO_EPSILON = 1e-3  # EXO needs a strictly positive epsilon (log eps); TRL's old default
LABEL_SMOOTHING = Option(
    "label_smoothing", float, None, "label-noise rate ε: cDPO (sigmoid), robust, EXO, AOT; "
    "EXO needs ε > 0", low=0.0, high=0.5, high_open=True, default_doc="None (0; EXO 1e-3)")
F_DIV = F_DIVERGENCE_OPTIONS


def _exo_epsilon_positive(cfg: LossConfig, raw: dict) -> None:
    if cfg.label_smoothing == 0.0:
        raise ValueError(
            "loss.label_smoothing=0 with exo_pair: EXO needs epsilon > 0 (it takes log eps); "
            f"leave it None for the default {DEFAULT_EXO_EPSILON}")


# ----------------------------------------------------------------------------- the losses
# Each loss is a function of the shared `_Ctx` registered with its declaration (spec.py): the
# order of the declarations is the documentation order of `losses.LOSS_NAMES`.


@register("sigmoid", reference_free_with="reference_free", options=(
    LABEL_SMOOTHING,
    Option("reference_free", bool, False, "reference-free DPO: reference log-probs taken as 0"),
    *F_DIV))
def _sigmoid(c: _Ctx) -> _Part:
    # DPO, Rafailov et al. 2023 Eq. 7: -log sigma(beta * h). With label_smoothing eps this is
    # conservative DPO (cDPO, Mitchell 2023): -(1-eps) log sigma(beta h) - eps log sigma(-beta h).
    # reference_free=True takes ref log-probs as 0 (TRL reference_free).
    # An f-divergence replaces each log-ratio by its score (f-DPO, Wang et al. 2023).
    beta = c.cfg.beta
    if c.cfg.reference_free:
        s_w, s_l = _scores(c, c.pi_w, c.pi_l)
        h = s_w - s_l
        rw, rl = _sg(beta * c.pi_w), _sg(beta * c.pi_l)
    else:
        h = _score_margin(c)
        rw, rl = _dpo_rewards(c)
    return _Part(_smoothed_logistic(beta * h, c.cfg.label_smoothing or 0.0), rw, rl, {})


@register("hinge", options=F_DIV)
def _hinge(c: _Ctx) -> _Part:
    # SLiC-HF rank-calibration loss, Zhao et al. 2023 (arXiv 2305.10425): max(0, delta - log-ratio),
    # in the DPO paper / TRL form with the reference: relu(1 - beta * h), i.e. delta = 1 / beta.
    return _Part(jax.nn.relu(1.0 - c.cfg.beta * _score_margin(c)), *_dpo_rewards(c), {})


def _ratios_and_scores(c: _Ctx) -> tuple[tuple[Array, Array], tuple[Array, Array]]:
    """``((c_w, c_l), (s_w, s_l))``: the log-ratios and their f-DPO scores."""
    c_w, c_l = _log_ratios(c)
    return (c_w, c_l), _scores(c, c_w, c_l)


@register("ipo", options=(
    Option("ipo_logps", str, "average", "IPO on per-token average log-probs (the paper's and "
           "TRL's) or on summed ones", choices=("average", "sum")),
    *F_DIV))
def _ipo(c: _Ctx) -> _Part:
    # IPO, Azar et al. 2023 Eq. 17: (h - 1/(2 tau))^2 with tau = beta. The paper (and TRL) use
    # per-token AVERAGE log-probs; ipo_logps='sum' uses summed log-probs instead.
    # An f-divergence replaces each summed log-ratio by its score before averaging (as TRL); the
    # residual is clipped to +-_IPO_MAX_RESIDUAL so its square stays finite in float32.
    beta = c.cfg.beta
    (c_w, c_l), (s_w, s_l) = _ratios_and_scores(c)
    if c.cfg.ipo_logps == "average":
        c_w, c_l, s_w, s_l = c_w / c.len_w, c_l / c.len_l, s_w / c.len_w, s_l / c.len_l
    residual = jnp.clip(s_w - s_l - 1.0 / (2.0 * beta), -_IPO_MAX_RESIDUAL, _IPO_MAX_RESIDUAL)
    return _Part(residual**2, _sg(beta * c_w), _sg(beta * c_l), {})


@register("exo_pair", options=(LABEL_SMOOTHING, *F_DIV), check=_exo_epsilon_positive)
def _exo_pair(c: _Ctx) -> _Part:
    # EXO-pref, Ji et al. 2024 Eq. 16 with K = 2: KL(p_theta || p_label) where
    # p_theta = (sigma(beta h), sigma(-beta h)) and p_label = (1 - eps, eps):
    # sigma(z)(log sigma(z) - log(1-eps)) + sigma(-z)(log sigma(-z) - log eps), z = beta h.
    eps = c.cfg.label_smoothing if c.cfg.label_smoothing is not None else DEFAULT_EXO_EPSILON
    z = c.cfg.beta * _score_margin(c)
    log_pw, log_pl = jnp.log1p(-eps), jnp.log(eps)
    losses = jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - log_pw) + jax.nn.sigmoid(-z) * (
        jax.nn.log_sigmoid(-z) - log_pl
    )
    return _Part(losses, *_dpo_rewards(c), {})


@register("nca_pair")
def _nca_pair(c: _Ctx) -> _Part:
    # NCA, Chen et al. 2024 (Noise Contrastive Alignment, arXiv 2402.05369; pairwise form as in
    # TRL nca_pair; eq. number not re-checked), r = beta c:
    # -log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l)   (TRL nca_pair).
    rw, rl = (c.cfg.beta * x for x in _log_ratios(c))
    losses = -jax.nn.log_sigmoid(rw) - 0.5 * jax.nn.log_sigmoid(-rw) - 0.5 * jax.nn.log_sigmoid(-rl)
    return _Part(losses, _sg(rw), _sg(rl), {})


@register("robust", options=(LABEL_SMOOTHING, *F_DIV))
def _robust(c: _Ctx) -> _Part:
    # Robust DPO (rDPO), Chowdhury et al. 2024 (arXiv 2403.00409; the de-biased loss under label-flip
    # rate eps, eq. number not re-checked), with
    # l(z) = -log sigma(z): [(1-eps) l(beta h) - eps l(-beta h)] / (1 - 2 eps).
    eps = c.cfg.label_smoothing or 0.0
    z = c.cfg.beta * _score_margin(c)
    losses = ((1.0 - eps) * -jax.nn.log_sigmoid(z) + eps * jax.nn.log_sigmoid(-z)) / (1.0 - 2.0 * eps)
    return _Part(losses, *_dpo_rewards(c), {})


@register("bco_pair", batch_statistic=True)
def _bco_pair(c: _Ctx) -> _Part:
    # BCO, Jung et al. 2024 (arXiv 2404.04656) on pairs (TRL bco_pair; eq. number not
    # re-checked): -log sigma(r_w - delta)
    # - log sigma(-(r_l - delta)), r = beta c. delta is the reward mean: TRL keeps a running mean
    # across steps; here it is the pair-weighted mean of r_w and r_l over the GLOBAL batch
    # (stop-gradient, padding excluded), which keeps the loss a pure function of the batch.
    rw, rl = (c.cfg.beta * x for x in _log_ratios(c))
    w = c.weights
    delta = _sg(jnp.sum(w * (rw + rl)) / jnp.maximum(2.0 * jnp.sum(w), 1e-12))
    losses = -jax.nn.log_sigmoid(rw - delta) - jax.nn.log_sigmoid(-(rl - delta))
    return _Part(losses, _sg(rw), _sg(rl), {"bco_delta": delta})


@register("sppo_hard")
def _sppo_hard(c: _Ctx) -> _Part:
    # SPPO, Wu et al. 2024 Eq. 4.7 (Algorithm 1) with hard win probabilities P = 1 / 0 and
    # eta = 1/beta: (c_w - 1/(2 beta))^2 + (c_l + 1/(2 beta))^2   (TRL sppo_hard).
    c_w, c_l = _log_ratios(c)
    half = 0.5 / c.cfg.beta
    return _Part((c_w - half) ** 2 + (c_l + half) ** 2, *_dpo_rewards(c), {})


def _rank_matched(c: _Ctx, x: Array, y: Array) -> _Part:
    """AOT's loss: ``x`` and ``y`` sorted separately over the batch (padding pairs last),
    ``delta_k = x_(k) - y_(k)`` and the (smoothed) logistic loss of ``beta delta_k``, stored at
    the pair holding ``x``'s rank ``k``."""
    order_x = _padding_last_order(x, c.weights)
    order_y = _padding_last_order(y, c.weights)
    delta = x[order_x] - y[order_y]
    rank_loss = _smoothed_logistic(c.cfg.beta * delta, c.cfg.label_smoothing or 0.0)
    return _Part(jnp.zeros_like(x).at[order_x].set(rank_loss), *_dpo_rewards(c), {})


@register("aot", batch_statistic=True, options=(LABEL_SMOOTHING,))
def _aot(c: _Ctx) -> _Part:
    # AOT paired, Melnyk et al. 2024 (arXiv 2406.05882; TRL aot): the policy log-ratios
    # pi_w - pi_l matched by rank with the reference log-ratios ref_w - ref_l.
    return _rank_matched(c, c.pi_w - c.pi_l, c.ref_w - c.ref_l)


@register("aot_unpaired", batch_statistic=True, options=(LABEL_SMOOTHING,))
def _aot_unpaired(c: _Ctx) -> _Part:
    # AOT unpaired, Melnyk et al. 2024 (arXiv 2406.05882; TRL aot_unpaired): the chosen
    # log-ratios c_w matched by rank with the rejected log-ratios c_l.
    return _rank_matched(c, *_log_ratios(c))


@register("apo_zero")
def _apo_zero(c: _Ctx) -> _Part:
    # APO-zero, D'Oosterlinck et al. 2024 Eq. 7: 1 - sigma(beta c_w) + sigma(beta c_l)
    # (raise chosen, lower rejected; for chosen answers better than the model's own).
    c_w, c_l = _log_ratios(c)
    beta = c.cfg.beta
    return _Part(1.0 - jax.nn.sigmoid(beta * c_w) + jax.nn.sigmoid(beta * c_l), *_dpo_rewards(c), {})


@register("apo_down")
def _apo_down(c: _Ctx) -> _Part:
    # APO-down, D'Oosterlinck et al. 2024 Eq. 8: sigma(beta c_w) + 1 - sigma(beta (c_w - c_l))
    # (lower both, rejected more; for chosen answers worse than the model's own).
    c_w, c_l = _log_ratios(c)
    beta = c.cfg.beta
    losses = jax.nn.sigmoid(beta * c_w) + 1.0 - jax.nn.sigmoid(beta * (c_w - c_l))
    return _Part(losses, *_dpo_rewards(c), {})


@register("discopop", options=(
    Option("discopop_tau", float, 0.05, "temperature τ of the logistic / exponential mixing "
           "(Lu et al. 2024; TRL discopop_tau)", low=0.0, low_open=True),
    *F_DIV))
def _discopop(c: _Ctx) -> _Part:
    # DiscoPOP / LRML, Lu et al. 2024 Eq. 5, z = beta h, tau = discopop_tau:
    # (1 - sigma(z/tau)) * (-log sigma(z)) + sigma(z/tau) * exp(-z).
    # The exponential branch is computed as exp(-z + log sigma(z/tau)) so that exp(-z) never
    # overflows on its own (TRL's exp(-z) * sigma(z/tau) is inf * 0 = NaN for z << 0).
    z = c.cfg.beta * _score_margin(c)
    tau = c.cfg.discopop_tau
    logistic = -jax.nn.log_sigmoid(z) * jax.nn.sigmoid(-z / tau)
    exponent = jnp.minimum(-z + jax.nn.log_sigmoid(z / tau), _DISCOPOP_MAX_EXPONENT)
    return _Part(logistic + jnp.exp(exponent), *_dpo_rewards(c), {})


@register("sigmoid_norm", options=F_DIV)
def _sigmoid_norm(c: _Ctx) -> _Part:
    # Length-normalised DPO (TRL sigmoid_norm; the Tulu 3 recipe, Lambert et al. 2024):
    # -log sigma(beta (s_w/|y_w| - s_l/|y_l|)), s = the log-ratio or its f-DPO score. Rewards
    # beta * c / |y| on the same per-token averages.
    beta = c.cfg.beta
    (c_w, c_l), (s_w, s_l) = _ratios_and_scores(c)
    losses = -jax.nn.log_sigmoid(beta * (s_w / c.len_w - s_l / c.len_l))
    return _Part(losses, _sg(beta * c_w / c.len_w), _sg(beta * c_l / c.len_l), {})


@register("sft", reference=False)
def _sft(c: _Ctx) -> _Part:
    # Supervised NLL of the chosen response, per-token average (TRL sft / MPO generation term).
    # SFT defines no implicit reward; the reported rewards are the per-token average log-probs
    # pi / |y| (no beta), so reward accuracy reads "chosen more likely per token than rejected".
    nll = _nll(c)
    return _Part(nll, _sg(c.pi_w / c.len_w), _sg(c.pi_l / c.len_l), {"nll_loss": nll})


@register("simpo", reference=False, options=(
    Option("simpo_gamma", float, 0.5, "target reward margin γ, in reward units (not γ/β); TRL "
           "CPOConfig.simpo_gamma", low=0.0),))
def _simpo(c: _Ctx) -> _Part:
    # SimPO, Meng et al. 2024 Eq. 6 (reference-free, length-normalised, target margin gamma):
    # -log sigma(beta pi_w/|y_w| - beta pi_l/|y_l| - gamma). Rewards beta * pi / |y| (Eq. 4).
    beta = c.cfg.beta
    rw, rl = beta * c.pi_w / c.len_w, beta * c.pi_l / c.len_l
    losses = -jax.nn.log_sigmoid(rw - rl - c.cfg.simpo_gamma)
    return _Part(losses, _sg(rw), _sg(rl), {})


def _log1mexp(x: Array) -> Array:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -ln 2 (Maechler 2012)."""
    return jnp.where(x > -0.6931471805599453, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


@register("orpo", reference=False)
def _orpo(c: _Ctx) -> _Part:
    # ORPO, Hong et al. 2024 Eq. 6-8: L = NLL(y_w) - lambda log sigma(log odds(y_w) - log odds(y_l)),
    # odds(y) = p / (1 - p) with log p = pi / |y| (per-token average); lambda = beta (as TRL's
    # ORPOConfig). log(1 - p) uses log1mexp with log p capped at ORPO_MAX_AVG_LOGP so p -> 1
    # stays finite. Rewards beta * pi / |y| (TRL ORPOTrainer).
    beta = c.cfg.beta
    avg_w = jnp.minimum(c.pi_w / c.len_w, ORPO_MAX_AVG_LOGP)
    avg_l = jnp.minimum(c.pi_l / c.len_l, ORPO_MAX_AVG_LOGP)
    log_odds = (avg_w - avg_l) - (_log1mexp(avg_w) - _log1mexp(avg_l))
    nll = _nll(c)
    log_sig = jax.nn.log_sigmoid(log_odds)
    losses = nll - beta * log_sig
    # Diagnostics named as TRL's ORPOTrainer logs them: log_odds_chosen = mean log odds ratio,
    # log_odds_ratio = mean log sigma(log odds ratio).
    extras = {"nll_loss": nll, "log_odds_chosen": log_odds, "log_odds_ratio": log_sig}
    return _Part(losses, _sg(beta * c.pi_w / c.len_w), _sg(beta * c.pi_l / c.len_l), extras)


@register("rpo", options=(
    Option("rpo_alpha", float, 1.0, "weight α of the chosen NLL added to DPO (Pang et al. 2024: "
           "1)", low=0.0),))
def _rpo(c: _Ctx) -> _Part:
    # RPO / IRPO, Pang et al. 2024 Eq. 1: DPO + alpha * NLL(y_w), the NLL normalised by the
    # chosen length (TRL rpo_alpha). Here the NLL is the per-pair token mean -pi_w/|y_w|; TRL
    # averages over all chosen tokens of the batch instead (equal when lengths are equal).
    c_w, c_l = _log_ratios(c)
    nll = _nll(c)
    losses = -jax.nn.log_sigmoid(c.cfg.beta * (c_w - c_l)) + c.cfg.rpo_alpha * nll
    return _Part(losses, *_dpo_rewards(c), {"nll_loss": nll})


@register("rdpo", options=(
    Option("rdpo_alpha", float, None, "length penalty α per token in βh - α(|y_w| - |y_l|)",
           low=0.0, required="e.g. 0.01; there is no safe default because it scales with "
           "response lengths", default_doc="None (required)"),))
def _rdpo(c: _Ctx) -> _Part:
    # R-DPO, Park et al. 2024 (arXiv 2403.19159; length-regularised DPO, eq. number not re-checked):
    # -log sigma(beta h - alpha (|y_w| - |y_l|)), lengths in tokens.
    c_w, c_l = _log_ratios(c)
    margin = c.cfg.beta * (c_w - c_l) - c.cfg.rdpo_alpha * (c.len_w - c.len_l)
    return _Part(-jax.nn.log_sigmoid(margin), *_dpo_rewards(c), {})


@register("dpop", options=(
    Option("dpop_lambda", float, 50.0, "weight λ of the penalty max(0, ref_w - pi_w) inside "
           "DPO's margin (Pal et al. 2024: 50)", low=0.0),))
def _dpop(c: _Ctx) -> _Part:
    # DPO-Positive, Pal et al. 2024 ("Smaug", arXiv 2402.13228, Eq. 3):
    # -log sigma(beta (h - lambda max(0, ref_w - pi_w))): the penalty switches on as soon as the
    # chosen log-prob falls below the reference's. Extra: dpop_penalty = max(0, ref_w - pi_w).
    c_w, c_l = _log_ratios(c)
    penalty = jax.nn.relu(-c_w)
    losses = -jax.nn.log_sigmoid(c.cfg.beta * (c_w - c_l - c.cfg.dpop_lambda * penalty))
    return _Part(losses, *_dpo_rewards(c), {"dpop_penalty": penalty})


def preference_loss(
    cfg: LossConfig,
    policy: SequenceStats,
    reference: SequenceStats | None,
    weights: Array | None = None,
) -> LossOutput:
    """Per-pair preference loss(es) and implicit rewards for one (global) batch of B pairs.

    Pure and jittable (cfg is static). Combined losses (cfg.names has several entries) are
    summed per pair with cfg.weights; the reported rewards are those of the first listed
    component that is not 'sft' (sft's own when it is alone). `weights` [B] (default all 1) only
    affects batch statistics (bco_pair mean, aot sorting) and the extras' means: `losses` is
    returned unweighted, reduce it with `weighted_mean(out.losses, weights)`.

    The reference's lengths are ignored: both models score the same tokens, so the policy's
    lengths are used everywhere.
    """
    for name in cfg.names:
        if spec(name).fn is None:
            raise ValueError(f"loss {name!r} trains on {KIND_DATA[spec(name).kind]}, not on "
                             "pairs (a pair source is split into the rows it needs)")
    if needs_reference(cfg) and reference is None:
        raise ValueError(f"loss(es) {list(cfg.names)} need reference log-probs, got reference=None")
    f32 = jnp.float32
    pi_w = jnp.asarray(policy.chosen_logps, f32)
    if weights is None:
        weights = jnp.ones_like(pi_w)
    ctx = _Ctx(
        cfg=cfg,
        pi_w=pi_w,
        pi_l=jnp.asarray(policy.rejected_logps, f32),
        ref_w=None if reference is None else jnp.asarray(reference.chosen_logps, f32),
        ref_l=None if reference is None else jnp.asarray(reference.rejected_logps, f32),
        # Padding pairs may have 0 scored tokens; clip so averages stay finite (0 * NaN = NaN).
        len_w=jnp.maximum(jnp.asarray(policy.chosen_lengths, f32), 1.0),
        len_l=jnp.maximum(jnp.asarray(policy.rejected_lengths, f32), 1.0),
        weights=jnp.asarray(weights, f32),
    )

    total = jnp.zeros_like(pi_w)
    extras: dict[str, Array] = {}
    parts: dict[str, _Part] = {}
    for name, w in zip(cfg.names, cfg.weights):
        part = parts[name] = spec(name).fn(ctx)
        total = total + w * part.losses
        for key, value in part.extras.items():  # per-pair diagnostics -> weighted batch means
            extras[key] = value if value.ndim == 0 else weighted_mean(_sg(value), ctx.weights)
        if len(cfg.names) > 1:
            extras[f"loss/{name}"] = weighted_mean(_sg(part.losses), ctx.weights)
    if cfg.use_weighting:
        # WPO, Zhou et al. 2024 Eq. 2 (TRL use_weighting): the pair's loss times
        # w(y_w) w(y_l), w(y) = exp(mean_t log(p_t / sum_v p_v^2)) under the policy, no gradient.
        if policy.chosen_wpo_logps is None or policy.rejected_wpo_logps is None:
            raise ValueError("loss.use_weighting (WPO) needs the policy's chosen_wpo_logps / "
                             "rejected_wpo_logps (logprobs.sequence_logps(with_wpo=True))")
        wpo = _sg(jnp.exp(jnp.asarray(policy.chosen_wpo_logps, f32)
                          + jnp.asarray(policy.rejected_wpo_logps, f32)))
        total = total * wpo
        extras["wpo_weight"] = weighted_mean(wpo, ctx.weights)
    reward_from = next((n for n in cfg.names if n != "sft"), cfg.names[0])
    return LossOutput(
        losses=total,
        chosen_rewards=parts[reward_from].chosen_rewards,
        rejected_rewards=parts[reward_from].rejected_rewards,
        extras=extras,
    )
