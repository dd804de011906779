"""Preference-optimisation losses (DPO and its family) as pure functions of sequence log-probs.

    from dpo_jax import losses
    loss_cfg = losses.loss_config_from(config.loss)   # validates
    out = losses.preference_loss(loss_cfg, policy_stats, reference_stats, weights=pair_weight)

See docs/losses.md for the table of losses, formulas, papers and hyperparameter ranges. Each loss
is a function registered with its declaration (`spec.register` / `spec.declare`: name, data
kind, reference, batch statistic, options); the config schema, its validation, the name sets
and the docs' option tables are generated from the declarations (`config.py`, `docs.py`).
"""

from dpo_jax.losses.config import (
    ALL_LOSS_NAMES,
    F_DIVERGENCE_LOSSES,
    F_DIVERGENCE_TYPES,
    LIST_LOSS_NAMES,
    LOSS_NAMES,
    OPTION_USERS,
    REFERENCE_FREE_LOSSES,
    UNPAIRED_LOSS_NAMES,
    LossConfig,
    default_loss_config,
    loss_config_from,
    needs_reference,
    uses_batch_statistics,
)
from dpo_jax.losses.core import preference_loss
from dpo_jax.losses.spec import LossSpec, Option, declare, register, specs
from dpo_jax.losses.kto import kto_loss, kto_reference_point
from dpo_jax.losses.listwise import listwise_loss, plackett_luce, ranked_stats
from dpo_jax.losses.terms import (
    F_SCORE_MAX,
    F_SCORE_MAX_EXPONENT,
    ORPO_MAX_AVG_LOGP,
    LossOutput,
    SequenceStats,
    f_divergence_score,
    weighted_mean,
)

__all__ = [
    "ALL_LOSS_NAMES",
    "LIST_LOSS_NAMES",
    "UNPAIRED_LOSS_NAMES",
    "kto_loss",
    "kto_reference_point",
    "listwise_loss",
    "plackett_luce",
    "ranked_stats",
    "F_DIVERGENCE_LOSSES",
    "F_DIVERGENCE_TYPES",
    "F_SCORE_MAX",
    "F_SCORE_MAX_EXPONENT",
    "LOSS_NAMES",
    "OPTION_USERS",
    "ORPO_MAX_AVG_LOGP",
    "REFERENCE_FREE_LOSSES",
    "LossConfig",
    "LossOutput",
    "SequenceStats",
    "f_divergence_score",
    "default_loss_config",
    "loss_config_from",
    "needs_reference",
    "uses_batch_statistics",
    "preference_loss",
    "LossSpec",
    "Option",
    "declare",
    "register",
    "specs",
    "weighted_mean",
]
