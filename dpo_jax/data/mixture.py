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

from typing import Sequence

import numpy as np

from dpo_jax.data.config import SOURCE_FIELDS, MixtureSource, read_data

__all__ = ["SOURCE_FIELDS", "MixtureSource", "interleave", "mixture_counts", "mixture_order",
           "mixture_sources"]


def mixture_sources(data_cfg) -> list[MixtureSource]:
    """The sources of ``data.sources`` ([] for a single source), read and checked by
    ``config.read_data`` (errors name ``data.sources[i]`` and the field)."""
    return list(read_data(data_cfg).sources)


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
