"""Loss configuration, generated from the loss declarations (`losses/spec.py`): the `config.loss`
schema, its validation into a frozen `LossConfig`, and the name sets.

Validation is strict on purpose: a preference-loss run that silently ignores an option (say
`label_smoothing` set while training IPO) produces a result that looks like an ablation but is
not one. So every option a loss declares defaults to None in the schema, and an option set to
anything other than None while none of the selected losses declares it is an error that names
the losses that would read it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

# Importing the loss modules runs their declarations: each registers its losses in spec.py.
from dpo_jax.losses import core, kto, listwise  # noqa: F401
from dpo_jax.losses.spec import (
    GENERAL_OPTIONS,
    LossConfig,
    finite,
    needs_reference,
    options,
    readers,
    spec,
    specs,
    uses_batch_statistics,
)
from dpo_jax.losses.terms import F_DIVERGENCE_TYPES

__all__ = ["ALL_LOSS_NAMES", "BATCH_STATISTIC_LOSSES", "F_DIVERGENCE_LOSSES",
           "F_DIVERGENCE_TYPES", "LIST_LOSS_NAMES", "LOSS_NAMES", "OPTION_USERS",
           "REFERENCE_FREE_LOSSES", "UNPAIRED_LOSS_NAMES", "LossConfig", "default_loss_config",
           "loss_config_from", "needs_reference", "uses_batch_statistics"]

# Every loss name, in documentation order (the declaration order): the pair losses, then
# plackett_luce (ranked lists; on pairs the K = 2 case), then kto (unpaired completions). Names
# follow Hugging Face TRL's `DPOConfig.loss_type` strings where TRL has the loss; simpo / orpo /
# rpo / rdpo are separate trainers or options in TRL and get their own names here. A loss of
# another data shape than pairs is trained alone (not combined with a pair loss).
LOSS_NAMES: tuple[str, ...] = tuple(s.name for s in specs() if s.kind == "pair")
LIST_LOSS_NAMES: tuple[str, ...] = tuple(s.name for s in specs() if s.kind == "list")
UNPAIRED_LOSS_NAMES: tuple[str, ...] = tuple(s.name for s in specs() if s.kind == "unpaired")
ALL_LOSS_NAMES: tuple[str, ...] = tuple(s.name for s in specs())

# Losses that never read a reference model (`sigmoid` joins them when reference_free=True).
REFERENCE_FREE_LOSSES: frozenset[str] = frozenset(s.name for s in specs() if not s.reference)
# Losses whose log-ratios TRL replaces by the f-DPO score (`f_divergence_type`).
F_DIVERGENCE_LOSSES: frozenset[str] = readers("f_divergence_type")
# Losses whose per-pair value depends on the rest of the batch.
BATCH_STATISTIC_LOSSES: frozenset[str] = frozenset(s.name for s in specs() if s.batch_statistic)
# Which losses read each option a loss declares. An option set (not None) while no selected loss
# is in its set is a ValueError. The general options (`name`, `weights`, `beta`, `use_weighting`,
# `ld_alpha`, `router_aux_loss_coef`) are read by every loss and are not listed.
OPTION_USERS: dict[str, frozenset[str]] = {
    o.name: readers(o.name) for o in options() if o not in GENERAL_OPTIONS}


def default_loss_config() -> ml_collections.ConfigDict:
    """The `config.loss` block: every declared option (docs/losses.md, "Options").

    Options a loss declares are typed placeholders, None until set (so `--config.loss.<option>=`
    works on the command line): None means "not set", and `loss_config_from` fills the declared
    default. `name` and `beta` hold their defaults (`router_aux_loss_coef` None: the model's,
    resolved by the step, `models.moe.router_aux_coef`).
    """
    cfg = ml_collections.ConfigDict()
    for option in options():
        cfg[option.name] = (option.default if option.fixed
                            else ml_collections.config_dict.placeholder(option.type))
    return cfg


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
    alone = [n for n in names if spec(n).kind != "pair"]
    if alone and len(names) > 1:
        raise ValueError(f"loss {alone[0]!r} is trained alone (its own data shape); "
                         f"loss.name={name!r} combines it with others")
    return names


def _parse_weights(w: Any, names: tuple[str, ...]) -> tuple[float, ...]:
    if w is None:
        return (1.0,) * len(names)
    if isinstance(w, (str, bytes)) or not isinstance(w, Sequence):
        raise ValueError(f"loss.weights must be a sequence of numbers, got {w!r}")
    weights = tuple(finite("weights", x) for x in w)
    if len(weights) != len(names):
        raise ValueError(
            f"loss.weights has {len(weights)} entries but loss.name lists {len(names)}: {names}")
    if any(x < 0 for x in weights) or sum(weights) <= 0:
        raise ValueError(f"loss.weights must be >= 0 with a positive sum, got {weights}")
    return weights


def loss_config_from(cfg: Any) -> LossConfig:
    """Validate `config.loss` (a ConfigDict or mapping) against the declarations and resolve the
    declared defaults into a frozen `LossConfig`.

    Raises ValueError for: an unknown loss name (listing the valid ones), an unknown key (listing
    the known ones), an option that none of the selected losses declares (naming the losses that
    read it), a required option left unset, a value of the wrong type or out of its declared
    range or choices (naming the field and the values that would work), and what the options'
    and losses' `check`s refuse (e.g. exo_pair with label_smoothing=0).
    """
    raw = _as_dict(cfg)
    schema = {o.name: o for o in options()}
    unknown_keys = sorted(set(raw) - set(schema))
    if unknown_keys:
        raise ValueError(f"unknown loss option(s) {unknown_keys}; known: {sorted(schema)}")
    full = {name: o.default if o.fixed else None for name, o in schema.items()} | raw

    names = _parse_names(full["name"])
    selected = set(names)
    for option, users in OPTION_USERS.items():
        if full[option] is not None and not (selected & users):
            raise ValueError(
                f"loss.{option}={full[option]!r} is set but unused by loss(es) {list(names)}; "
                f"it is read only by: {', '.join(sorted(users))}")
    weights = _parse_weights(full["weights"], names)

    values = {}
    for option in options():
        if option.name in ("name", "weights"):
            continue
        needers = [n for n in names if n in OPTION_USERS.get(option.name, ())]
        if option.required and full[option.name] is None and needers:
            raise ValueError(f"loss {needers[0]!r} needs loss.{option.name} ({option.doc}); "
                             f"{option.required}")
        values[option.name] = option.resolve(full[option.name])
    beta = values.pop("beta")
    loss_cfg = LossConfig(names=names, weights=weights, beta=beta,
                          options=tuple(sorted(values.items())))
    for check in [o.check for o in options()] + [spec(n).check for n in names]:
        if check is not None:
            check(loss_cfg, full)
    return loss_cfg
