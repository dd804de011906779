"""Unpaired feedback: a prompt, one completion and a desirable / undesirable label
(``data.format='unpaired'``, loss ``kto``).

Sources: ``generic`` rows with ``data.field_prompt``, ``data.field_completion`` and
``data.field_label`` (a bool), or any pair source (``generic`` rows without the completion
column, ``hh``, ``shp``, ``tldr``, ``ultrafeedback``, ``synthetic``) split into unpaired rows as
TRL's ``unpair_preference_dataset`` does: (prompt, chosen, True) and (prompt, rejected, False).

Batches: each example is two sequences in the pair layout (slot 0: the prompt with its own
completion; slot 1: the prompt with the completion of the batch's previous example, cyclically,
cut to ``data.max_length`` tokens -- TRL's ``_get_kl_dataset`` +1 offset, applied to the
global batch as served, so the mismatched completions are the batch's own; with
``data.prefix_sharing`` both in one unit behind one prompt) and ``desirable`` float32 [B]
(1 / 0). ``losses.kto`` reads slot 1's log-ratios for its reference point.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from dpo_jax.data import batching
from dpo_jax.data.checks import check_scored_response
from dpo_jax.data.errors import DataError
from dpo_jax.data.ranked import PromptItem, SlotPipeline
from dpo_jax.data.sources import PARSERS, Message, RawPair, _get, _get_str, _messages


@dataclasses.dataclass
class RawUnpaired(PromptItem):
    """One labelled completion before tokenisation."""

    prompt: str | list[Message]
    completion: str
    label: bool
    file: str = ""
    row: int = -1
    weight: float = 1.0

    @property
    def responses(self) -> list[str]:
        return [self.completion]


def unpair(pair: RawPair) -> list[RawUnpaired]:
    """(prompt, chosen, True) and (prompt, rejected, False) of one pair."""
    return [RawUnpaired(pair.prompt, pair.chosen, True, pair.file, pair.row, pair.weight),
            RawUnpaired(pair.prompt, pair.rejected, False, pair.file, pair.row, pair.weight)]


def unpair_tokens(pairs: list[dict]) -> list[dict]:
    """Tokenised pairs as tokenised unpaired examples, chosen then rejected of each pair."""
    out = []
    for p in pairs:
        out.append({"prompt": p["prompt"], "completion": p["chosen"], "desirable": True})
        out.append({"prompt": p["prompt"], "completion": p["rejected"], "desirable": False})
    return out


def parse_unpaired_generic(rec, file: str, row: int, cfg) -> list[RawUnpaired]:
    """A row with the completion column is one example; a pair row (no such column) is two."""
    fc, fl = cfg.field_completion, cfg.field_label
    if fc not in rec:
        return unpair(PARSERS["generic"](rec, file, row, cfg))
    label = _get(rec, fl, file, row)
    if not isinstance(label, (bool, np.bool_)):
        raise DataError(f"expected a bool label, got {type(label).__name__} {label!r}",
                        file=file, row=row, field=fl, reason="bad_label")
    prompt = _get(rec, cfg.field_prompt, file, row)
    if not isinstance(prompt, str):
        prompt = _messages(prompt, file, row, cfg.field_prompt)
    return [RawUnpaired(prompt, _get_str(rec, fc, file, row), bool(label), file, row)]


def unpaired_parser(source: str):
    """The row parser of ``source`` for unpaired examples (pair sources are unpaired)."""
    if source == "generic":
        return parse_unpaired_generic
    parse_pair = PARSERS[source]

    def parse(rec, file, row, cfg):
        pair = parse_pair(rec, file, row, cfg)
        return None if pair is None else unpair(pair)

    return parse


def checked_unpaired(item: dict, *, end_ids, is_blank, file, row) -> dict[str, Any]:
    """The tokenised example after the per-response checks of pairs."""
    ends = np.asarray(sorted(int(t) for t in end_ids), np.int64)
    check_scored_response(len(item["prompt"]), item["completion"], ends=ends, is_blank=is_blank,
                          file=file, row=row, field="completion")
    if len(item["prompt"]) == 0:
        raise DataError("the prompt has no token, so nothing predicts the first response token",
                        file=file, row=row, field="prompt", reason="unscored_first_token")
    return {"prompt": np.asarray(item["prompt"], np.int32),
            "completion": np.asarray(item["completion"], np.int32),
            "desirable": bool(item["desirable"])}


class UnpairedPipeline(SlotPipeline):
    """Unpaired examples as batches (module doc)."""

    item_name = "unpaired examples"

    def __init__(self, items: list[dict], cfg, **kwargs):
        self._desirable = np.asarray([float(it["desirable"]) for it in items], np.float32)
        super().__init__(items, cfg, **kwargs)
        # Any two examples may meet in a later epoch's batch: the largest bucket must hold
        # every prompt with every completion.
        bound = self._bound(np.arange(len(items)))
        if bound > self.buckets[-1]:
            self.buckets = self.buckets + [batching.round_up(bound, self.cfg.bucket_multiple)]
            self.pack_length = int(self.cfg.pack_length) or self.buckets[-1]

    def _bound(self, idx: np.ndarray) -> int:
        """At least the longest sequence (prefix sharing: unit) of any batch of items ``idx``:
        the KL slot pairs a prompt with another example's completion."""
        lens = self.lengths[idx]
        if self.prefix_sharing:
            return int(lens[:, 0].max() + 1 + 2 * lens[:, 1].max())
        return int(min(lens[:, 0].max() + lens[:, 1].max(), self.cfg.max_length))

    def _longest(self, idx: np.ndarray) -> int:
        return self._bound(idx)

    def _slot_lengths(self, idx: np.ndarray) -> np.ndarray:
        lens = self.lengths[idx]
        kl = np.minimum(lens[:, 0] + np.roll(lens[:, 1], 1),
                        np.maximum(self.cfg.max_length, lens[:, 0] + 1))
        return np.concatenate([lens[:, 0] + lens[:, 1], kl])

    def unit(self, idx: np.ndarray, j: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """The prompt with its completion and the previous example's, cut to max_length."""
        item = self.pairs[int(idx[j])]
        prompt = item["prompt"]
        other = self.pairs[int(idx[(j - 1) % len(idx)])]["completion"]
        keep = max(int(self.cfg.max_length) - len(prompt), 1)
        return prompt, [item["completion"], other[:keep]]

    def per_item(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {"desirable": self._desirable[idx]}
