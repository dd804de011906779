"""Eval metrics as (numerator, denominator) pairs, reduced once.

An eval step returns ``{name: (numerator, denominator)}``: two scalars, each a sum over the
whole global batch (``jnp.sum`` of a sharded array inside the jitted step adds every device's
rows). The reported value of a metric is the sum of its numerators over every eval batch divided
by the sum of its denominators (:func:`means`): a mean over the split, computed once. Each
metric has its own denominator: DPO's metrics (TRL's ``rewards/accuracies``, ``loss``, ...)
divide by the summed pair weights (padding pairs weigh 0), a per-token mean by the scored
tokens, an accuracy over one bucket of pairs by the weight of that bucket. A metric whose
denominators are all 0 is a total (a count of pairs in a histogram bin): its summed numerator.
Values that are not ratios of sums (perplexity = exp of the token-mean NLL) are ``derived``
from the means.

An eval step may also return per-example arrays under the key :data:`PER_EXAMPLE`
(``{name: [B]}``, e.g. ``step.make_eval_step`` with diagnostics); :func:`totals` hands them to
its ``per_example`` sink batch by batch instead of reducing them.

A task adds a metric by returning one more pair from its eval step; nothing else changes::

    def eval_step(params, batch):
        m = dpo_metrics(...)                             # {name: (num, den)}
        long_B = batch_lengths_B > 32
        m["accuracy/long"] = (jnp.sum(w_B * long_B * correct_B), jnp.sum(w_B * long_B))
        return m

A mixture of eval sources (``data.sources``: splits ``eval/<name>``) reports every source's
metrics as ``<name>/<metric>`` and the overall metric from the sources' summed pairs
(:func:`evaluator_by_source`): every eval example runs through the model once.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp

Ratio = tuple[Any, Any]  # (numerator, denominator): scalars, jax or host
Totals = dict[str, tuple[float, float]]
Derived = Callable[[dict[str, float]], dict[str, float]]

# A denominator of 0 (no example of a bucket, an eval split of padding only) reads as 0, not NaN:
# its numerator, a sum over no example, is 0 too. A metric declared with denominator 0 (a
# count) therefore reads as its summed numerator.
MIN_DENOMINATOR = 1e-9
PER_EXAMPLE = "per_example"  # an eval step's per-example arrays {name: [B]}, not a ratio


def over(sums: Mapping[str, Any], denominator) -> dict[str, Ratio]:
    """``{name: (sum, denominator)}``: the metrics of ``sums`` that share one denominator."""
    return {k: (v, denominator) for k, v in sums.items()}


def weighted_mean(values, weights) -> Ratio:
    """``(sum(w * values), sum(w))`` in float32: a mean over examples of weight ``w`` (``[B]``)."""
    w = weights.astype(jnp.float32)
    return jnp.sum(w * values), jnp.sum(w)


def add(totals: Mapping[str, tuple[float, float]], metrics: Mapping[str, Ratio]) -> Totals:
    """``totals`` plus ``metrics`` pair by pair, as host floats (float64). A name in only one of
    them keeps its pair. Raises ValueError for a value that is not a (numerator, denominator)
    pair."""
    out = dict(totals)
    for name, ratio in metrics.items():
        if not isinstance(ratio, (tuple, list)) or len(ratio) != 2:
            raise ValueError(f"eval metric {name!r} is {type(ratio).__name__}; an eval step "
                             "returns {name: (numerator, denominator)} (eval_metrics.over)")
        num, den = out.get(name, (0.0, 0.0))
        out[name] = (num + float(ratio[0]), den + float(ratio[1]))
    return out


def totals(metrics_of: Callable[[Any], Mapping[str, Ratio]], batches: Iterable,
           per_example: Callable[[dict], None] | None = None) -> Totals:
    """The pairs of ``metrics_of(batch)`` summed over ``batches`` (read to the host once per
    batch). Its :data:`PER_EXAMPLE` entry, if any, goes to ``per_example(values)`` (host
    arrays, batch by batch, in order) and is dropped when no sink is given."""
    out: Totals = {}
    for batch in batches:
        metrics = dict(jax.device_get(metrics_of(batch)))
        values = metrics.pop(PER_EXAMPLE, None)
        if values is not None and per_example is not None:
            per_example(values)
        out = add(out, metrics)
    return out


def means(summed: Mapping[str, tuple[float, float]], derived: Derived | None = None
          ) -> dict[str, float]:
    """Each metric's summed numerator over its summed denominator (a denominator of 0: the
    numerator, a total), then ``derived(means)``'s entries added (e.g. perplexity from the
    token-mean NLL)."""
    out = {k: num / max(den, MIN_DENOMINATOR) if den > 0 else num
           for k, (num, den) in summed.items()}
    if derived is not None:
        out.update(derived(out))
    return out


def reduce(metrics_of: Callable[[Any], Mapping[str, Ratio]], batches: Iterable,
           derived: Derived | None = None) -> dict[str, float]:
    """The one eval reduction: :func:`means` of :func:`totals`."""
    return means(totals(metrics_of, batches), derived)


def evaluator_by_source(totals_of: Callable[[Any], Callable[[Any], Totals] | None],
                        streams: Mapping[str, Any], derived: Derived | None = None):
    """``evaluate(state) -> {name: value}`` over ``streams['eval']``; for a mixture (streams
    ``'eval/<name>'`` present, the slices of ``'eval'`` by source) each source's metrics as
    ``'<name>/<metric>'`` and the overall ones from the sources' summed pairs, so every eval
    example runs once. ``totals_of(stream)`` gives ``state -> Totals`` over one stream (e.g.
    ``loop.eval_totals``). None without an ``'eval'`` stream."""
    if streams.get("eval") is None:
        return None
    per_source = {k.split("/", 1)[1]: totals_of(v) for k, v in streams.items()
                  if k.startswith("eval/")}
    if not per_source:
        whole = totals_of(streams["eval"])
        return lambda state: means(whole(state), derived)

    def evaluate(state) -> dict[str, float]:
        by_source = {name: of(state) for name, of in per_source.items()}
        summed: Totals = {}
        for source_totals in by_source.values():
            summed = add(summed, source_totals)
        out = means(summed, derived)
        for name, source_totals in by_source.items():
            out.update({f"{name}/{k}": v for k, v in means(source_totals, derived).items()})
        return out

    return evaluate
