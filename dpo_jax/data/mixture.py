"""Mixtures of preference sources (``data.sources``): per-source configs, the deterministic
interleaving of their pairs by weight, and the per-source stats.

``data.sources`` is a list of entries, each a dict of the source-specific fields of the data
config (:data:`SOURCE_FIELDS`: ``source``, ``path``, splits, field mappings, caps, the hh / shp
filters) plus ``weight`` (> 0) and an optional ``name`` (default: the source; repeated names get
``_2``, ``_3``). Every other data field (tokenizer, lengths, truncation, buckets, packing,
shuffling) is shared by all sources and set once at the top level. An empty list is the
single-source config.

Train order of epoch ``e`` over the ``N`` pairs of all sources together (:func:`mixture_order`):
source ``i`` fills ``n_i`` of the ``N`` slots, ``n_i`` its weight's share of ``N`` (largest
remainders; a source above its natural share repeats pairs, one below it sees a different subset
each epoch), its pairs drawn from its own permutations seeded by ``(seed, e, i)`` (file order
with ``data.shuffle=False``); each source's slots are spread evenly over the epoch
(:func:`interleave`), so every batch holds the sources in proportion. The order is a pure function of ``(seed, e)``, so the
stream position ``(epoch, position)`` resumes it exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import ml_collections
import numpy as np

SOURCE_FIELDS = (
    "source", "path", "hub_config", "train_split", "eval_split", "eval_size", "eval_fraction",
    "max_pairs", "field_prompt", "field_chosen", "field_rejected", "weight_field",
    "hh_single_turn", "hh_chat", "shp_min_score_ratio", "shp_max_pairs_per_post", "on_bad_row")


@dataclasses.dataclass(frozen=True)
class MixtureSource:
    """One source of a mixture: its ``name``, ``weight`` and data config (the top-level data
    config with the entry's fields set)."""

    name: str
    weight: float
    cfg: Any


def mixture_sources(data_cfg) -> list[MixtureSource]:
    """The sources of ``data_cfg.sources`` ([] when it is empty or absent).

    Raises ``ValueError`` naming ``data.sources[i]`` (and its source) and the field for an
    entry that is not a dict, lacks ``source``, has a weight that is not a positive finite
    number or a field that is not per-source, and for a per-source config that does not
    validate."""
    from dpo_jax.data.config import validate

    entries = data_cfg.get("sources") or []
    out: list[MixtureSource] = []
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        where = f"data.sources[{i}]"
        if isinstance(entry, ml_collections.ConfigDict):
            entry = entry.to_dict()
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a dict of source fields, got {entry!r}")
        if not entry.get("source"):
            raise ValueError(f"{where}: field 'source' is required (one of the data sources)")
        where = f"{where} (source {entry['source']!r})"
        unknown = sorted(set(entry) - set(SOURCE_FIELDS) - {"weight", "name"})
        if unknown:
            raise ValueError(f"{where}: field(s) {unknown} are not per-source; per-source "
                             f"fields: {list(SOURCE_FIELDS)} + weight, name (set the others "
                             "once in data.*)")
        weight = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                math.isfinite(weight) and weight > 0):
            raise ValueError(f"{where}: field 'weight' must be a positive finite number, got "
                             f"{weight!r}")
        cfg = ml_collections.ConfigDict(data_cfg.to_dict())
        cfg.sources = []
        for key in SOURCE_FIELDS:
            if key in entry:
                cfg[key] = entry[key]
        try:
            validate(cfg)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
        if cfg.source == "synthetic":
            raise ValueError(f"{where}: the synthetic source has no files to mix; use file or "
                             "hub sources")
        base = str(entry.get("name") or entry["source"])
        seen[base] = seen.get(base, 0) + 1
        name = base if seen[base] == 1 else f"{base}_{seen[base]}"
        out.append(MixtureSource(name=name, weight=float(weight), cfg=cfg))
    return out


def mixture_counts(weights: Sequence[float], total: int) -> np.ndarray:
    """Slots of each source among ``total``: ``total * w_i / sum(w)`` rounded by largest
    remainders (ties to the earlier source), summing to ``total``."""
    w = np.asarray(weights, np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[:total - int(counts.sum())]] += 1
    return counts


def interleave(counts: Sequence[int]) -> np.ndarray:
    """``[sum(counts)]`` source ids, ``counts[i]`` of id ``i``, each source's slots spread
    evenly: its ``j``-th slot sits at the fraction ``(j + 1/2) / counts[i]`` of the sequence
    (ties to the earlier source)."""
    counts = [int(c) for c in counts]
    ids = np.repeat(np.arange(len(counts)), counts)
    at = np.concatenate([(np.arange(c) + 0.5) / c for c in counts if c] or [np.zeros(0)])
    return ids[np.argsort(at, kind="stable")]


def mixture_order(sizes: Sequence[int], weights: Sequence[float], *, seed: Sequence[int],
                  epoch: int, shuffle: bool = True) -> np.ndarray:
    """Epoch ``epoch``'s order ``[N]`` of indices into the concatenated pairs of the sources
    (source ``i``'s pairs at ``sum(sizes[:i])`` on), as the module doc says."""
    sizes = [int(s) for s in sizes]
    total = sum(sizes)
    counts = mixture_counts(weights, total)
    slots = interleave(counts)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    order = np.empty(total, np.int64)
    for i, (size, n) in enumerate(zip(sizes, counts)):
        reps = -(-int(n) // size)
        if shuffle:
            rng = np.random.default_rng([*seed, epoch, 1_000_003 + i])
            items = np.concatenate([rng.permutation(size) for _ in range(reps)])
        else:
            items = np.tile(np.arange(size), reps)
        order[slots == i] = offsets[i] + items[:n]
    return order
