"""Loss configuration: the `config.loss` ConfigDict, its validation, and the frozen `LossConfig`.

Validation is strict on purpose: a preference-loss run that silently ignores an option (say
`label_smoothing` set while training IPO) produces a result that looks like an ablation but is
not one. So every optional option defaults to None, and an option set to anything other than
None while none of the selected losses reads it is an error that names the losses that would.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

# Every loss name this package implements, in documentation order. Names follow Hugging Face
# TRL's `DPOConfig.loss_type` strings where TRL has the loss; simpo / orpo / rpo / rdpo are
# separate trainers or options in TRL and get their own names here.
LOSS_NAMES: tuple[str, ...] = (
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sigmoid_norm",
    "sft",
    "simpo",
    "orpo",
    "rpo",
    "rdpo",
    "dpop",
)
# Losses of other data shapes (not pairs of chosen/rejected): the Plackett-Luce objective over
# ranked lists of K responses (data.format='ranked'; on pairs it is the K = 2 case, sigmoid) in
# losses/listwise.py, and KTO over unpaired labelled completions (data.format='unpaired') in
# losses/kto.py. Each is trained alone (not combined with a pair loss).
LIST_LOSS_NAMES: tuple[str, ...] = ("plackett_luce",)
UNPAIRED_LOSS_NAMES: tuple[str, ...] = ("kto",)
ALL_LOSS_NAMES: tuple[str, ...] = LOSS_NAMES + LIST_LOSS_NAMES + UNPAIRED_LOSS_NAMES

# Losses that never look at a reference model. `sigmoid` joins them when reference_free=True.
REFERENCE_FREE_LOSSES: frozenset[str] = frozenset({"simpo", "orpo", "sft"})

# Losses whose log-ratios TRL replaces by the f-DPO score (`f_divergence_type`): the ones built on
# the chosen and rejected log-ratios alone. Any other selected loss with a non-default divergence
# is a ValueError naming it (TRL refuses them too).
F_DIVERGENCE_LOSSES: frozenset[str] = frozenset(
    {"sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm"})
F_DIVERGENCE_TYPES: tuple[str, ...] = ("reverse_kl", "forward_kl", "js_divergence",
                                       "alpha_divergence")

# Which losses read each optional option. An option set (not None) while no selected loss is in
# its set is a ValueError. `beta`, `name` and `weights` are always meaningful (sft ignores beta,
# documented) and are not listed.
OPTION_USERS: dict[str, frozenset[str]] = {
    "label_smoothing": frozenset({"sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"}),
    "reference_free": frozenset({"sigmoid"}),
    "ipo_logps": frozenset({"ipo"}),
    "simpo_gamma": frozenset({"simpo"}),
    "rpo_alpha": frozenset({"rpo"}),
    "rdpo_alpha": frozenset({"rdpo"}),
    "discopop_tau": frozenset({"discopop"}),
    "dpop_lambda": frozenset({"dpop"}),
    "f_divergence_type": F_DIVERGENCE_LOSSES,
    "f_alpha_divergence_coef": F_DIVERGENCE_LOSSES,
    "pl_top_k": frozenset({"plackett_luce"}),
    "desirable_weight": frozenset({"kto"}),
    "undesirable_weight": frozenset({"kto"}),
}

# Defaults applied when the option is None and a loss that reads it is selected.
DEFAULT_EXO_EPSILON = 1e-3  # EXO needs a strictly positive epsilon (log eps); TRL's old default
DEFAULT_SIMPO_GAMMA = 0.5  # TRL CPOConfig.simpo_gamma
DEFAULT_RPO_ALPHA = 1.0  # Pang et al. 2024 use alpha = 1
DEFAULT_DISCOPOP_TAU = 0.05  # Lu et al. 2024 / TRL DPOConfig.discopop_tau
DEFAULT_DPOP_LAMBDA = 50.0  # Pal et al. 2024 (Smaug) use lambda = 50
DEFAULT_F_ALPHA_DIVERGENCE_COEF = 0.5  # TRL DPOConfig.f_alpha_divergence_coef


def default_loss_config() -> ml_collections.ConfigDict:
    """The `config.loss` block with every field documented; optional options are None.

    None means "not set": `loss_config_from` fills the per-loss default only when a selected loss
    reads the option, and rejects any non-None option that no selected loss reads.
    """
    # Typed placeholders (None until set) so --config.loss.<option>=... works on the command line.
    placeholder = ml_collections.config_dict.placeholder
    cfg = ml_collections.ConfigDict()
    # Loss name(s): one of LOSS_NAMES, or a comma-separated list ("sigmoid,sft") that is summed.
    cfg.name = "sigmoid"
    # Per-loss weights for a list of names (like TRL loss_weights); None = all 1.0.
    cfg.weights = placeholder(tuple)
    # Inverse temperature / KL strength (DPO beta, IPO tau, SLiC 1/delta, ORPO lambda). Must be > 0.
    cfg.beta = 0.1
    # cDPO / robust / EXO / AOT label-noise rate epsilon in [0, 0.5); None = 0 (EXO: 1e-3).
    cfg.label_smoothing = placeholder(float)
    # sigmoid only: True = reference-free DPO (reference log-probs taken as 0); None = False.
    cfg.reference_free = placeholder(bool)
    # ipo only: "average" (per-token mean log-probs, the paper/TRL form) or "sum"; None = average.
    cfg.ipo_logps = placeholder(str)
    # simpo only: target reward margin gamma (in reward units, not gamma/beta); None = 0.5.
    cfg.simpo_gamma = placeholder(float)
    # rpo only: weight alpha of the chosen NLL term added to DPO; None = 1.0.
    cfg.rpo_alpha = placeholder(float)
    # rdpo only: length penalty alpha in beta*h - alpha*(|y_w| - |y_l|); required, no default.
    cfg.rdpo_alpha = placeholder(float)
    # discopop only: temperature tau of the logistic/exponential mixing; None = 0.05.
    cfg.discopop_tau = placeholder(float)
    # dpop only: weight lambda of the penalty max(0, ref_w - pi_w) inside DPO's margin; None = 50.
    cfg.dpop_lambda = placeholder(float)
    # f-DPO score replacing each log-ratio (TRL's name and values): reverse_kl (plain DPO),
    # forward_kl, js_divergence or alpha_divergence; None = reverse_kl. Read by sigmoid, hinge,
    # ipo, exo_pair, robust, discopop and sigmoid_norm; any other selected loss refuses it.
    cfg.f_divergence_type = placeholder(str)
    # alpha of f_divergence_type='alpha_divergence' (any finite value; 1 is reverse_kl); None = 0.5.
    cfg.f_alpha_divergence_coef = placeholder(float)
    # WPO (TRL use_weighting): each pair's loss times the policy's length-normalised probability
    # of both responses, prod_t (p_t / sum_v p_v^2)^(1/|y|) (no gradient); None = False.
    cfg.use_weighting = placeholder(bool)
    # LD-DPO (TRL ld_alpha): tokens of a response past the shorter response's length count with
    # weight ld_alpha in [0, 1] in every summed log-prob (policy and reference); None = off.
    cfg.ld_alpha = placeholder(float)
    # plackett_luce only: only the first pl_top_k ranks are stages of the Plackett-Luce model
    # (the top-k truncated ranking likelihood); None = all ranks.
    cfg.pl_top_k = placeholder(int)
    # kto only: weight of the desirable examples' losses (TRL KTOConfig); None = 1.
    cfg.desirable_weight = placeholder(float)
    # kto only: weight of the undesirable examples' losses (TRL KTOConfig); None = 1.
    cfg.undesirable_weight = placeholder(float)
    # Mixture-of-experts policies: weight of the router's load-balancing loss (transformers'
    # load_balancing_loss_func over all layers) added to the loss; 0 = off (TRL's default:
    # only with output_router_logits). Any loss; a model without experts refuses > 0.
    cfg.router_aux_loss_coef = 0.0
    return cfg


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Validated, resolved loss options. Frozen and hashable, so it can be a static jit argument."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    beta: float
    label_smoothing: float | None  # None = not set (0 for cDPO/robust/AOT, 1e-3 for EXO)
    reference_free: bool
    ipo_logps: str
    simpo_gamma: float
    rpo_alpha: float
    rdpo_alpha: float | None
    discopop_tau: float
    dpop_lambda: float = DEFAULT_DPOP_LAMBDA
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = DEFAULT_F_ALPHA_DIVERGENCE_COEF
    use_weighting: bool = False
    ld_alpha: float | None = None  # None = LD-DPO off
    pl_top_k: int | None = None  # None = every rank is a Plackett-Luce stage
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    router_aux_loss_coef: float = 0.0  # 0 = no router load-balancing term


def _as_dict(cfg: Any) -> dict[str, Any]:
    if isinstance(cfg, ml_collections.ConfigDict):
        return cfg.to_dict()
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"loss config must be a ConfigDict or mapping, got {type(cfg).__name__}")


def _parse_names(name: Any) -> tuple[str, ...]:
    if isinstance(name, str):
        names = tuple(n.strip() for n in name.split(","))
    elif isinstance(name, Sequence):
        names = tuple(str(n).strip() for n in name)
    else:
        raise ValueError(f"loss.name must be a string or a list of strings, got {name!r}")
    if not names or any(not n for n in names):
        raise ValueError(f"loss.name has an empty entry: {name!r}")
    unknown = [n for n in names if n not in ALL_LOSS_NAMES]
    if unknown:
        raise ValueError(f"unknown loss name(s) {unknown}; valid names: "
                         f"{', '.join(ALL_LOSS_NAMES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"loss.name lists a loss twice: {names}")
    alone = [n for n in names if n in LIST_LOSS_NAMES + UNPAIRED_LOSS_NAMES]
    if alone and len(names) > 1:
        raise ValueError(f"loss {alone[0]!r} is trained alone (its own data shape); "
                         f"loss.name={name!r} combines it with others")
    return names


def _finite(name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"loss.{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"loss.{name} must be finite, got {value}")
    return value


def loss_config_from(cfg: Any) -> LossConfig:
    """Validate `config.loss` and resolve per-loss defaults into a frozen `LossConfig`.

    Raises ValueError for: an unknown loss name (listing the valid ones), an unknown key, an
    option that none of the selected losses reads (naming the losses that read it), and values
    out of range (beta <= 0, label_smoothing outside [0, 0.5), ...).
    """
    raw = _as_dict(cfg)
    known = set(default_loss_config().keys())
    unknown_keys = sorted(set(raw) - known)
    if unknown_keys:
        raise ValueError(f"unknown loss option(s) {unknown_keys}; known: {sorted(known)}")
    full = default_loss_config().to_dict()
    full.update(raw)

    names = _parse_names(full["name"])
    selected = set(names)

    for option, users in OPTION_USERS.items():
        if full[option] is not None and not (selected & users):
            raise ValueError(
                f"loss.{option}={full[option]!r} is set but unused by loss(es) {list(names)}; "
                f"it is read only by: {', '.join(sorted(users))}"
            )

    if full["weights"] is None:
        weights = (1.0,) * len(names)
    else:
        w = full["weights"]
        if isinstance(w, (str, bytes)) or not isinstance(w, Sequence):
            raise ValueError(f"loss.weights must be a sequence of numbers, got {w!r}")
        weights = tuple(_finite("weights", x) for x in w)
        if len(weights) != len(names):
            raise ValueError(
                f"loss.weights has {len(weights)} entries but loss.name lists {len(names)}: {names}"
            )
        if any(x < 0 for x in weights) or sum(weights) <= 0:
            raise ValueError(f"loss.weights must be >= 0 with a positive sum, got {weights}")

    beta = _finite("beta", full["beta"])
    if beta <= 0:
        raise ValueError(f"loss.beta must be > 0, got {beta}")

    label_smoothing = full["label_smoothing"]
    if label_smoothing is not None:
        label_smoothing = _finite("label_smoothing", label_smoothing)
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"loss.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        if "exo_pair" in selected and label_smoothing == 0.0:
            raise ValueError(
                "loss.label_smoothing=0 with exo_pair: EXO needs epsilon > 0 (it takes log eps); "
                f"leave it None for the default {DEFAULT_EXO_EPSILON}"
            )

    reference_free = full["reference_free"]
    if reference_free is not None and not isinstance(reference_free, bool):
        raise ValueError(f"loss.reference_free must be a bool, got {reference_free!r}")

    ipo_logps = full["ipo_logps"] if full["ipo_logps"] is not None else "average"
    if ipo_logps not in ("average", "sum"):
        raise ValueError(f"loss.ipo_logps must be 'average' or 'sum', got {ipo_logps!r}")

    simpo_gamma = DEFAULT_SIMPO_GAMMA
    if full["simpo_gamma"] is not None:
        simpo_gamma = _finite("simpo_gamma", full["simpo_gamma"])
        if simpo_gamma < 0:
            raise ValueError(f"loss.simpo_gamma must be >= 0, got {simpo_gamma}")

    rpo_alpha = DEFAULT_RPO_ALPHA
    if full["rpo_alpha"] is not None:
        rpo_alpha = _finite("rpo_alpha", full["rpo_alpha"])
        if rpo_alpha < 0:
            raise ValueError(f"loss.rpo_alpha must be >= 0, got {rpo_alpha}")

    rdpo_alpha = full["rdpo_alpha"]
    if "rdpo" in selected:
        if rdpo_alpha is None:
            raise ValueError(
                "loss 'rdpo' needs loss.rdpo_alpha (length penalty per token, e.g. 0.01); "
                "there is no safe default because it scales with response lengths"
            )
        rdpo_alpha = _finite("rdpo_alpha", rdpo_alpha)
        if rdpo_alpha < 0:
            raise ValueError(f"loss.rdpo_alpha must be >= 0, got {rdpo_alpha}")

    discopop_tau = DEFAULT_DISCOPOP_TAU
    if full["discopop_tau"] is not None:
        discopop_tau = _finite("discopop_tau", full["discopop_tau"])
        if discopop_tau <= 0:
            raise ValueError(f"loss.discopop_tau must be > 0, got {discopop_tau}")

    dpop_lambda = DEFAULT_DPOP_LAMBDA
    if full["dpop_lambda"] is not None:
        dpop_lambda = _finite("dpop_lambda", full["dpop_lambda"])
        if dpop_lambda < 0:
            raise ValueError(f"loss.dpop_lambda must be >= 0, got {dpop_lambda}")

    f_type = full["f_divergence_type"] if full["f_divergence_type"] is not None else "reverse_kl"
    if f_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"loss.f_divergence_type={f_type!r}: expected one of "
                         f"{', '.join(F_DIVERGENCE_TYPES)}")
    if f_type != "reverse_kl":
        others = [n for n in names if n not in F_DIVERGENCE_LOSSES]
        if others:
            raise ValueError(
                f"loss.f_divergence_type={f_type!r} does not apply to loss(es) {others} (as in "
                f"TRL, only {', '.join(sorted(F_DIVERGENCE_LOSSES))} replace their log-ratios by "
                "the f-DPO score); drop those losses or use f_divergence_type='reverse_kl'")
    f_alpha = DEFAULT_F_ALPHA_DIVERGENCE_COEF
    if full["f_alpha_divergence_coef"] is not None:
        if f_type != "alpha_divergence":
            raise ValueError(
                f"loss.f_alpha_divergence_coef={full['f_alpha_divergence_coef']!r} is set but "
                f"unused with f_divergence_type={f_type!r}; it is read only with "
                "f_divergence_type='alpha_divergence'")
        f_alpha = _finite("f_alpha_divergence_coef", full["f_alpha_divergence_coef"])

    use_weighting = full["use_weighting"]
    if use_weighting is not None and not isinstance(use_weighting, bool):
        raise ValueError(f"loss.use_weighting must be a bool, got {use_weighting!r}")
    ld_alpha = full["ld_alpha"]
    if ld_alpha is not None:
        ld_alpha = _finite("ld_alpha", ld_alpha)
        if not 0.0 <= ld_alpha <= 1.0:
            raise ValueError(f"loss.ld_alpha must be in [0, 1], got {ld_alpha}")

    pl_top_k = full["pl_top_k"]
    if pl_top_k is not None:
        if isinstance(pl_top_k, bool) or not isinstance(pl_top_k, int) or pl_top_k < 1:
            raise ValueError(f"loss.pl_top_k must be an int >= 1, got {pl_top_k!r}")
    kto_weights = {}
    for option in ("desirable_weight", "undesirable_weight"):
        value = 1.0 if full[option] is None else _finite(option, full[option])
        if value <= 0:
            raise ValueError(f"loss.{option} must be > 0, got {value}")
        kto_weights[option] = value
    router_aux_loss_coef = _finite("router_aux_loss_coef", full["router_aux_loss_coef"])
    if router_aux_loss_coef < 0:
        raise ValueError(f"loss.router_aux_loss_coef must be >= 0, got {router_aux_loss_coef}")

    return LossConfig(
        names=names,
        weights=weights,
        beta=beta,
        label_smoothing=label_smoothing,
        reference_free=bool(reference_free),
        ipo_logps=ipo_logps,
        simpo_gamma=simpo_gamma,
        rpo_alpha=rpo_alpha,
        rdpo_alpha=rdpo_alpha,
        discopop_tau=discopop_tau,
        dpop_lambda=dpop_lambda,
        f_divergence_type=f_type,
        f_alpha_divergence_coef=f_alpha,
        use_weighting=bool(use_weighting),
        ld_alpha=ld_alpha,
        pl_top_k=pl_top_k,
        router_aux_loss_coef=router_aux_loss_coef,
        **kto_weights,
    )


def needs_reference(cfg: LossConfig) -> bool:
    """True when any selected loss reads reference log-probs, so train.py must keep ref params.

    simpo, orpo and sft never do; sigmoid does not with reference_free=True.
    """
    for name in cfg.names:
        if name in REFERENCE_FREE_LOSSES:
            continue
        if name == "sigmoid" and cfg.reference_free:
            continue
        return True
    return False


BATCH_STATISTIC_LOSSES = frozenset({"bco_pair", "aot", "aot_unpaired", "kto"})


def uses_batch_statistics(cfg: LossConfig) -> bool:
    """True when a pair's loss depends on other pairs of the batch (bco mean, aot sorting, KTO's
    reference point z0), so micro-batch accumulation would change the objective."""
    return any(name in BATCH_STATISTIC_LOSSES for name in cfg.names)
