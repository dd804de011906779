"""Loss declarations: a loss is one function plus a `LossSpec` registered next to it.

    LABEL_SMOOTHING = Option("label_smoothing", float, None, "label-noise rate ε", low=0.0,
                             high=0.5, high_open=True)

    @register("robust", options=(LABEL_SMOOTHING,))
    def _robust(c: _Ctx) -> LossOutput: ...

A declaration says what the rest of the package needs to know about a loss: its name (TRL's
`loss_type` string where TRL has the loss), the data it trains on (`kind`: pairs, ranked lists or
unpaired completions), whether it reads the reference model (and which bool option turns that
off), whether a pair's loss depends on the rest of the batch (a batch statistic: micro-batch
accumulation would change it), and the options it reads, each with a type, a default, a range or
choices and a one-line doc. `losses/config.py` generates the `config.loss` schema, its
validation, the name sets and `needs_reference` from the registry; `losses/docs.py` generates
the tables of docs/losses.md. Nothing here reads a ConfigDict or an array.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

KINDS = ("pair", "list", "unpaired")  # the data a loss trains on: pairs, ranked lists, unpaired
KIND_DATA = {"pair": "pairs", "list": "ranked lists (data.format='ranked'); pairs as K = 2",
             "unpaired": "unpaired completions (data.format='unpaired')"}


@dataclasses.dataclass(frozen=True)
class Option:
    """One `config.loss` option.

    `default` is the resolved value when the config leaves the option None (None = "off" /
    "not set" for the losses that read it); `fixed=True` puts `default` itself in the schema
    instead of a typed None placeholder. `low`/`high` bound a number (`*_open`: strict);
    `choices` lists a string's values; `required` (a reason) means no default exists: a selected
    loss that reads it without it set is a ValueError quoting the reason. `check(cfg, raw)`
    validates what depends on other options (raw = the config's values before defaults).
    `default_doc` / `values_doc` replace the docs' rendering of `default` / of the range.
    """

    name: str
    type: type  # bool, int, float, str or tuple
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    required: str = ""
    fixed: bool = False
    default_doc: str = ""
    values_doc: str = ""
    check: Callable[[Any, dict[str, Any]], None] | None = dataclasses.field(
        default=None, compare=False)

    def range_text(self) -> str:
        """The allowed values as the error messages and docs state them ('' = any)."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.low is not None and self.high is not None:
            return (f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                    f"{')' if self.high_open else ']'}")
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high:g}"
        return ""

    def resolve(self, value: Any) -> Any:
        """The validated value (`default` for None). Raises ValueError naming `loss.<name>`, the
        value and the values that would work."""
        if value is None and not self.fixed:
            return self.default
        where = f"loss.{self.name}"
        if self.type is bool:
            if not isinstance(value, bool):
                raise ValueError(f"{where} must be a bool, got {value!r}")
            return value
        if self.type is str:
            if self.choices and value not in self.choices:
                raise ValueError(f"{where}={value!r}: expected {self.range_text()}")
            return value
        if self.type is int:
            if isinstance(value, bool) or not isinstance(value, int) or not self._in_range(value):
                raise ValueError(f"{where} must be an int {self.range_text()}, got {value!r}")
            return value
        value = finite(self.name, value)
        if not self._in_range(value):
            raise ValueError(f"{where} must be {self.range_text()}, got {value}")
        return value

    def _in_range(self, x: float) -> bool:
        low_ok = self.low is None or (x > self.low if self.low_open else x >= self.low)
        high_ok = self.high is None or (x < self.high if self.high_open else x <= self.high)
        return low_ok and high_ok


def finite(name: str, value: Any) -> float:
    """`value` as a finite float, else a ValueError naming `loss.<name>`."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"loss.{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"loss.{name} must be finite, got {value}")
    return value


# Options every loss reads, not declared by a loss, so "unused" never applies to them. `name` and
# `weights` have their own parsing (losses/config.py).
BASE_OPTIONS: tuple[Option, ...] = (
    Option("name", str, "sigmoid", "a loss name, or a comma-separated list (`\"sigmoid,sft\"`) "
           "or list of names whose losses are summed per pair", fixed=True,
           values_doc="declared names (table above)"),
    Option("weights", tuple, None, "per-name weights of a combined loss, >= 0 with a positive "
           "sum (TRL `loss_weights`)", default_doc="None (all 1)",
           values_doc="one number >= 0 per name, positive sum"),
    Option("beta", float, 0.1, "inverse temperature / KL strength (DPO β, IPO τ, SLiC 1/δ, ORPO "
           "λ); `sft` ignores it", low=0.0, low_open=True, fixed=True),
)
# Features every loss supports (the step reads them, see docs/losses.md).
FEATURE_OPTIONS: tuple[Option, ...] = (
    Option("use_weighting", bool, False, "WPO: each pair's loss times the policy's "
           "length-normalised probability of both responses, no gradient (TRL `use_weighting`)"),
    Option("ld_alpha", float, None, "LD-DPO: weight of the tokens past the shorter response in "
           "every summed log-prob, policy and reference (TRL `ld_alpha`)", low=0.0, high=1.0,
           default_doc="None (off)"),
    Option("router_aux_loss_coef", float, None, "mixture-of-experts policies: weight of the "
           "router's load-balancing loss added to the loss (None: the model config's "
           "`router_aux_loss_coef`, as TRL 1.16; 0: off); a model without experts refuses > 0",
           low=0.0, default_doc="None (the model's; 0 without experts)"),
)
GENERAL_OPTIONS = BASE_OPTIONS + FEATURE_OPTIONS


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """The declaration of one loss (module doc).

    `fn(ctx) -> LossOutput` computes the loss on a batch of pairs (core.py's `_Ctx`); None when
    the loss cannot read pairs (`kto`). `reference_free_with` names a bool option that, when True,
    makes a reference-reading loss reference-free. `check(cfg, raw)` validates what only this
    loss requires of its options.
    """

    name: str
    fn: Callable[[Any], Any] | None
    kind: str = "pair"
    reference: bool = True
    reference_free_with: str = ""
    batch_statistic: bool = False
    options: tuple[Option, ...] = ()
    check: Callable[[Any, dict[str, Any]], None] | None = None

    @property
    def option_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.options)

    def needs_reference(self, cfg: LossConfig) -> bool:
        return self.reference and not (self.reference_free_with
                                       and getattr(cfg, self.reference_free_with))


_REGISTRY: dict[str, LossSpec] = {}
_OPTIONS: dict[str, Option] = {}  # the losses' options, in declaration order


def declare(spec: LossSpec) -> LossSpec:
    """Add `spec` to the registry. Raises ValueError for a name declared twice, an unknown kind,
    an option declared differently by two losses, or a `reference_free_with` it does not read."""
    if spec.name in _REGISTRY:
        raise ValueError(f"loss {spec.name!r} is declared twice")
    if spec.kind not in KINDS:
        raise ValueError(f"loss {spec.name!r}: kind {spec.kind!r} is not one of {KINDS}")
    if spec.kind == "pair" and spec.fn is None:
        raise ValueError(f"pair loss {spec.name!r} needs a function")
    for option in spec.options:
        known = _OPTIONS.get(option.name)
        if option.name in {o.name for o in GENERAL_OPTIONS} or (known and known is not option):
            raise ValueError(f"loss {spec.name!r}: option {option.name!r} is already declared "
                             "differently; share one Option object between the losses that read it")
    free = {o.name: o for o in spec.options}.get(spec.reference_free_with)
    if spec.reference_free_with and (free is None or free.type is not bool):
        raise ValueError(f"loss {spec.name!r}: reference_free_with={spec.reference_free_with!r} "
                         "must name a bool option the loss declares")
    for option in spec.options:
        _OPTIONS.setdefault(option.name, option)
    _REGISTRY[spec.name] = spec
    return spec


def register(name: str, **declaration: Any) -> Callable[[Callable], Callable]:
    """Decorator: `@register("ipo", options=(...))` declares the decorated pair function as the
    loss `name` (keyword arguments: the `LossSpec` fields) and returns it unchanged."""
    def wrap(fn: Callable) -> Callable:
        declare(LossSpec(name=name, fn=fn, **declaration))
        return fn
    return wrap


def specs() -> tuple[LossSpec, ...]:
    """Every declared loss: pair losses, then list, then unpaired, each in declaration order."""
    return tuple(sorted(_REGISTRY.values(), key=lambda s: KINDS.index(s.kind)))


def spec(name: str) -> LossSpec:
    return _REGISTRY[name]


def options() -> tuple[Option, ...]:
    """Every `config.loss` option: BASE_OPTIONS, the losses' (in the order of `specs()`), then
    FEATURE_OPTIONS."""
    declared = {o.name: o for s in specs() for o in s.options}
    return BASE_OPTIONS + tuple(declared.values()) + FEATURE_OPTIONS


def readers(option: str) -> frozenset[str]:
    """The losses that declare `option`."""
    return frozenset(s.name for s in _REGISTRY.values() if option in s.option_names)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Validated, resolved loss options (`config.loss_config_from` builds it). Frozen and
    hashable, so it can be a static jit argument.

    names: the selected losses; weights: one per name; beta: β. Every other declared option is
    an attribute (`cfg.simpo_gamma`, `cfg.ld_alpha`), resolved to its default when unset, kept in
    `options` as sorted (name, value) pairs.
    """

    names: tuple[str, ...]
    weights: tuple[float, ...]
    beta: float
    options: tuple[tuple[str, Any], ...] = ()

    def __getattr__(self, name: str) -> Any:
        # Reached only for names that are not fields: the declared options.
        for key, value in self.__dict__.get("options", ()):
            if key == name:
                return value
        raise AttributeError(f"LossConfig has no option {name!r}")


def needs_reference(cfg: LossConfig) -> bool:
    """True when any selected loss reads reference log-probs, so the task must keep reference
    parameters (or stored reference log-probs). From the declarations: simpo, orpo and sft never
    do; sigmoid does not with reference_free=True."""
    return any(spec(name).needs_reference(cfg) for name in cfg.names)


def uses_batch_statistics(cfg: LossConfig) -> bool:
    """True when a pair's loss depends on other pairs of the batch (bco's mean, aot's sorting,
    KTO's reference point z0), so micro-batch accumulation would change the objective."""
    return any(spec(name).batch_statistic for name in cfg.names)
