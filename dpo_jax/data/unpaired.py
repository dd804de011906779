"""Unpaired feedback: a prompt, one completion and a desirable / undesirable label
(``data.format='unpaired'``, loss ``kto``).

Sources: ``generic`` rows with ``data.field_prompt``, ``data.field_completion`` and
``data.field_label`` (a bool), or any pair source (``generic`` rows without the completion
column, ``hh``, ``shp``, ``tldr``, ``ultrafeedback``, ``synthetic``) split into unpaired rows as
TRL's ``unpair_preference_dataset`` does: (prompt, chosen, True) and (prompt, rejected, False).

Batches: each example is two sequences in the pair layout (slot 0: the prompt with its own
completion; slot 1: the prompt with its *mismatched* (KL) completion, cut to
``data.max_length`` tokens; with ``data.prefix_sharing`` both in one unit behind one prompt)
and ``desirable`` float32 [B] (1 / 0). ``losses.kto`` reads slot 1's log-ratios for its
reference point z0.

The KL completion of example j of the global batch (as served, over all processes; eval
padding slots included) is the completion of the nearest previous example of the batch,
cyclically, whose completion tokens as cut differ from example j's own -- TRL's
``_get_kl_dataset`` +1 offset whenever the previous example's completion differs, so the
mismatched completions are the batch's own. When no example of the batch has a different
completion (``train.batch_size=1``, an eval batch of one real example padded with its own
copies, a batch of identical completions), it is the nearest previous item of the split, in
dataset order cyclically, whose completion differs. So a KL completion is never the example's
own completion, by construction (TRL refuses ``per_device_train_batch_size=1`` instead); a
split whose items all have one completion is a ``DataError`` (``kl_completion``) at
construction.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np

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
        ids: dict[bytes, int] = {}
        self._completion_id = np.asarray(
            [ids.setdefault(np.asarray(it["completion"], np.int64).tobytes(), len(ids))
             for it in items], np.int64)
        self._partners_cache: tuple[bytes | None, np.ndarray | None] = (None, None)
        if len(ids) < 2:
            raise DataError(
                f"all {len(items)} examples of this split have the same completion, so KTO's "
                "reference point has no mismatched completion to score (it would equal the "
                "implied reward): give the split examples with different completions",
                file=str(cfg.path or cfg.source), field="completion",
                reason="kl_completion")
        # Any two examples may meet in a later epoch's batch: the largest bucket holds every
        # prompt with every completion (``_bound`` of the whole split, the base's longest unit).
        super().__init__(items, cfg, **kwargs)

    def _differs(self, i: int, c: int) -> bool:
        """Whether item ``c``'s completion, cut as item ``i``'s KL slot cuts it, differs from
        item ``i``'s own completion."""
        if self._completion_id[c] == self._completion_id[i]:
            return False
        own = self.pairs[i]["completion"]
        keep = max(int(self.cfg.max_length) - len(self.pairs[i]["prompt"]), 1)
        return not np.array_equal(self.pairs[c]["completion"][:keep], own)

    def kl_partners(self, idx: np.ndarray) -> np.ndarray:
        """[B] int64: the item whose completion is the KL completion of each example of the
        global batch ``idx`` (module doc; eval padding -1 reads item 0, as served)."""
        idx = np.where(np.asarray(idx) >= 0, idx, 0)
        key = idx.tobytes()
        if self._partners_cache[0] == key:
            return self._partners_cache[1]
        B, N = len(idx), len(self.pairs)
        out = np.empty(B, np.int64)
        for j in range(B):
            i = int(idx[j])
            in_batch = (int(idx[(j - k) % B]) for k in range(1, B))
            in_split = ((i - k) % N for k in range(1, N))
            for c in itertools.chain(in_batch, in_split):
                if self._differs(i, c):
                    out[j] = c
                    break
            else:
                raise DataError(f"item {i}: every other completion of the split, cut to "
                                f"data.max_length={self.cfg.max_length} after its prompt, "
                                "equals its own: no mismatched completion for KTO's reference "
                                "point", row=i, field="completion", reason="kl_completion")
        self._partners_cache = (key, out)
        return out

    def _bound(self, idx: np.ndarray) -> int:
        """At least the longest sequence (prefix sharing: unit) of any batch of items ``idx``:
        the KL slot pairs a prompt with another example's completion."""
        idx = np.where(np.asarray(idx) >= 0, idx, 0)
        lens = self.lengths[idx]
        longest = max(lens[:, 1].max(), self.lengths[self.kl_partners(idx), 1].max())
        if self.prefix_sharing:
            return int(lens[:, 0].max() + 1 + lens[:, 1].max() + longest)
        return int(min(lens[:, 0].max() + longest, self.cfg.max_length))

    def _longest(self, idx: np.ndarray) -> int:
        return self._bound(idx)

    def _slot_lengths(self, idx: np.ndarray) -> np.ndarray:
        lens = self.lengths[idx]
        kl = np.minimum(lens[:, 0] + self.lengths[self.kl_partners(idx), 1],
                        np.maximum(self.cfg.max_length, lens[:, 0] + 1))
        return np.concatenate([lens[:, 0] + lens[:, 1], kl])

    def unit(self, idx: np.ndarray, j: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """The prompt with its completion and its KL completion (``kl_partners``), cut to
        max_length."""
        item = self.pairs[int(idx[j])]
        prompt = item["prompt"]
        other = self.pairs[int(self.kl_partners(idx)[j])]["completion"]
        keep = max(int(self.cfg.max_length) - len(prompt), 1)
        return prompt, [item["completion"], other[:keep]]

    def per_item(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {"desirable": self._desirable[idx]}
