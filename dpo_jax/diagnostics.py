"""Per-pair diagnostics of what preference training does to each pair: likelihood displacement.

Razin et al. 2024 ("Unintentional Unalignment: Likelihood Displacement in Direct Preference
Optimization", arXiv 2410.08847) call *likelihood displacement* the fall of the chosen
response's log-probability during DPO training (often with the rejected one falling faster, so
the margin still grows), and trace it to pairs whose chosen and rejected responses have similar
hidden representations, measured by the CHES score (their Definition 2):

    CHES_x(y+, y-) = < sum_k h_{x, y+_{<k}}, sum_k' h_{x, y-_{<k'}} > - || sum_k h_{x, y+_{<k}} ||^2

where ``h_{x, y_{<k}}`` is the last layer's hidden state (after the final norm: the vector the
LM head multiplies) at the position that predicts response token ``k``, for ``k = 1 .. |y|``
(EOS included as the last response token). The length-normalised form that the paper filters
data with (Section 6; ``ches/ches.py`` of the authors' code) divides each sum by its length:

    ln-CHES_x(y+, y-) = < s+ / |y+|, s- / |y-| > - || s+ / |y+| ||^2

Both are computed here as ``<s+, s- - s+>`` (one dot product, no cancellation of two large
terms). The sums come from the training forward itself (``logprobs.sequence_logps(...,
with_hidden=True)``): no second forward.

Everything here is pure jnp over per-pair arrays ``[B]`` (and ``[B, D]`` hidden sums); the
step (``dpo_jax/step.py``) adds :func:`pair_extras` to the loss output's extras, whose
pair-weighted sums are the metrics, and :func:`per_pair` to an eval step's per-example output
(``eval_metrics.PER_EXAMPLE``; written to ``eval_pairs/`` by ``dpo_jax/eval_pairs.py``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

# Fixed edges of the reward-margin histogram (reward units: beta * log-ratio difference for
# DPO); two open-ended bins lie outside them.
MARGIN_EDGES = (-4.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 4.0)
HIST_PREFIX = "margins_hist/"
QUANTILES = (0.1, 0.5, 0.9)  # of CHES and ln-CHES over an eval split (eval_pairs.quantiles)


def _edge(x: float) -> str:
    return "inf" if x == math.inf else "-inf" if x == -math.inf else f"{x:g}"


def margin_bins(edges=MARGIN_EDGES) -> tuple[tuple[str, float, float], ...]:
    """``(metric name, low, high)`` of each histogram bin ``low <= margin < high``, from
    ``-inf`` to ``inf``: e.g. ``margins_hist/-0.5_0`` holds margins in ``[-0.5, 0)``."""
    bounds = (-math.inf, *edges, math.inf)
    return tuple((f"{HIST_PREFIX}{_edge(lo)}_{_edge(hi)}", lo, hi)
                 for lo, hi in zip(bounds[:-1], bounds[1:]))


def is_count(name: str) -> bool:
    """Whether metric ``name`` is a count of pairs (a histogram bin: a pair-weighted sum, never
    divided by the pairs' weight) rather than a mean."""
    return name.startswith(HIST_PREFIX)


def ches_scores(chosen_h_BD, rejected_h_BD, chosen_lengths_B, rejected_lengths_B):
    """``(ches_B, ln_ches_B)`` float32: Razin et al. 2024's CHES score (Definition 2) and its
    length-normalised form (Section 6) of each pair (module docstring).

    ``chosen_h_BD`` / ``rejected_h_BD``: per pair, the sum over the response's scored tokens
    of the hidden states that predict them (``SequenceLogps.hidden_sums``); the lengths are the
    scored-token counts (a zero length reads as 1, so an empty response gives a finite score)."""
    c = chosen_h_BD.astype(jnp.float32)
    r = rejected_h_BD.astype(jnp.float32)
    ches = jnp.sum(c * (r - c), axis=-1)
    cn = c / jnp.maximum(chosen_lengths_B.astype(jnp.float32), 1.0)[:, None]
    rn = r / jnp.maximum(rejected_lengths_B.astype(jnp.float32), 1.0)[:, None]
    return ches, jnp.sum(cn * (rn - cn), axis=-1)


def pair_extras(policy, reference, out, hidden_SD) -> dict[str, jax.Array]:
    """Per-pair values ``{metric name: [B] float32}`` whose pair-weighted sums are the
    diagnostics metrics (no gradient):

    * ``ches/mean``, ``ln_ches/mean``: :func:`ches_scores` from the policy's hidden states;
    * ``margins_hist/<low>_<high>``: 1 for the bin of the pair's reward margin
      (``out.chosen_rewards - out.rejected_rewards``; :func:`margin_bins`), a count;
    * with a reference (``reference`` a ``losses.SequenceStats``, else None: reference-free
      losses have none): ``logps_delta/chosen`` and ``logps_delta/rejected``, the policy's
      summed log-prob minus the reference's (nats); ``displacement/chosen_fell`` 1 when the
      chosen log-prob is below the reference's, ``displacement/both_fell`` when both are.

    ``policy``: ``losses.SequenceStats`` of the policy; ``hidden_SD``: ``[2B, D]`` hidden sums,
    chosen then rejected."""
    hidden_SD = jax.lax.stop_gradient(hidden_SD)
    chosen_h, rejected_h = jnp.split(hidden_SD, 2)
    ches, ln_ches = ches_scores(chosen_h, rejected_h, policy.chosen_lengths,
                                policy.rejected_lengths)
    extras = {"ches/mean": ches, "ln_ches/mean": ln_ches}
    margin = jax.lax.stop_gradient(out.chosen_rewards - out.rejected_rewards).astype(jnp.float32)
    for name, lo, hi in margin_bins():
        extras[name] = ((margin >= lo) & (margin < hi)).astype(jnp.float32)
    if reference is not None:
        d_chosen = jax.lax.stop_gradient(policy.chosen_logps - reference.chosen_logps)
        d_rejected = jax.lax.stop_gradient(policy.rejected_logps - reference.rejected_logps)
        extras.update({
            "logps_delta/chosen": d_chosen, "logps_delta/rejected": d_rejected,
            "displacement/chosen_fell": (d_chosen < 0).astype(jnp.float32),
            "displacement/both_fell": ((d_chosen < 0) & (d_rejected < 0)).astype(jnp.float32)})
    return extras


def per_pair(policy, out, weights_B) -> dict[str, jax.Array]:
    """An eval batch's per-pair values ``{name: [B]}`` for ``eval_pairs/`` (``out.extras``
    holds :func:`pair_extras`): ``weight`` (0 = padding), the policy's summed log-probs
    ``chosen_logps`` / ``rejected_logps``, their change from the reference ``chosen_delta`` /
    ``rejected_delta`` (absent without a reference), the reward ``margin``, ``ches`` and
    ``ln_ches``."""
    ex = out.extras
    values = {"weight": weights_B.astype(jnp.float32),
              "chosen_logps": policy.chosen_logps, "rejected_logps": policy.rejected_logps,
              "margin": out.chosen_rewards - out.rejected_rewards,
              "ches": ex["ches/mean"], "ln_ches": ex["ln_ches/mean"]}
    if "logps_delta/chosen" in ex:
        values.update(chosen_delta=ex["logps_delta/chosen"],
                      rejected_delta=ex["logps_delta/rejected"])
    return {k: jax.lax.stop_gradient(v).astype(jnp.float32) for k, v in values.items()}
