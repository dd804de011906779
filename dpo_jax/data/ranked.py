"""Ranked lists: a prompt with K rated responses (``data.format='ranked'``, loss
``plackett_luce``), and the batching shared with unpaired completions (``data/unpaired.py``).

Sources:

* ``generic``: a file with a prompt column (``data.field_prompt``), a list-of-responses column
  (``data.field_responses``: texts, or assistant message contents with a message-list prompt)
  and a list-of-scores column (``data.field_scores``, higher is better);
* ``ultrafeedback``: the rated-completions format of ``openbmb/UltraFeedback`` (the hub path
  when ``data.path`` is empty): ``instruction`` and ``completions``, each a dict with
  ``response`` and ``overall_score`` (``data.field_scores`` names another numeric key, e.g.
  ``fine-grained_score``, or ``annotations`` for the mean of the per-aspect ``Rating``s); the
  prompt is the single user message ``instruction`` (rendered by the tokenizer's chat template);
* ``synthetic``: ``data.synthetic.num_responses`` responses per prompt with their true rewards
  as scores (``synthetic.make_ranked``).

Order and ties: responses are sorted by score, best first (stable: equal scores keep the file's
order) and each gets its *competition rank* (the number of strictly better responses), so tied
responses share a rank; ``losses.listwise`` treats a tie group with Breslow's approximation of
the tied Plackett-Luce likelihood (see there). Identical responses (after tokenisation and
truncation) are kept once, with the better score. A list needs two distinct responses.

Tokens follow the rules of pairs (``tokenize.PairTokenizer.encode_lists``: boundary, BOS, one
end token, truncation with the longest response deciding) and every response passes the
per-response checks of pairs (``checks.check_scored_response``).

Batches: K slots per prompt laid out slot-major like pairs (rows ``[slot 0 of the B prompts,
slot 1, ..., slot K-1]``; K = the most responses of any list of the split; with
``data.prefix_sharing`` one unit ``[prompt, y_1 .. y_k]`` per prompt, ``data/prefix.py``),
``slot_rank`` int32 [B, K] the ranks (-1 on the empty slots of shorter lists: sequences
without tokens that the loss ignores), ``pair_weight`` [B].
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import numpy as np

from dpo_jax.data import batching, prefix
from dpo_jax.data.checks import check_scored_response
from dpo_jax.data.config import read_data
from dpo_jax.data.errors import DataError
from dpo_jax.data.pipeline import PreferencePipeline
from dpo_jax.data.sources import Message, _get, _get_str, _messages

log = logging.getLogger("dpo_jax.data")
Item = dict[str, Any]


class PromptItem:
    """What ``PairTokenizer.encode_lists`` reads of a raw item besides ``responses``: a text or
    message-list ``prompt`` (``is_chat``), ``file`` and ``row``."""

    prompt: str | list[Message]

    @property
    def is_chat(self) -> bool:
        return isinstance(self.prompt, list)


@dataclasses.dataclass
class RawRanked(PromptItem):
    """One ranked list before tokenisation: ``responses`` sorted best first, ``scores``
    (descending) aligned with them."""

    prompt: str | list[Message]
    responses: list[str]
    scores: list[float]
    file: str = ""
    row: int = -1
    weight: float = 1.0


def competition_ranks(scores_K: np.ndarray) -> np.ndarray:
    """int32 [K]: for each score, how many scores are strictly higher (ties share a rank)."""
    s = np.asarray(scores_K, np.float64)
    return (s[None, :] > s[:, None]).sum(axis=1).astype(np.int32)


def ranked(prompt, responses: list[str], scores: list, file: str, row: int,
           field: str) -> RawRanked:
    """A ``RawRanked`` sorted best first; ``DataError`` for bad scores or < 2 responses."""
    if len(responses) != len(scores):
        raise DataError(f"{len(responses)} responses but {len(scores)} scores", file=file,
                        row=row, field=field, reason="bad_format")
    vals = []
    for v in scores:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
                or not math.isfinite(float(v)):
            raise DataError(f"score {v!r} is not a finite number", file=file, row=row,
                            field=field, reason="bad_score")
        vals.append(float(v))
    if len(responses) < 2:
        raise DataError(f"a ranked list needs two responses, got {len(responses)}", file=file,
                        row=row, field=field, reason="too_few_responses")
    order = np.argsort(-np.asarray(vals), kind="stable")
    return RawRanked(prompt, [responses[i] for i in order], [vals[i] for i in order], file, row)


def parse_ranked_generic(rec, file: str, row: int, cfg) -> RawRanked:
    """prompt (text, or messages), responses (list of texts), scores (list of numbers)."""
    fr, fs = cfg.field_responses, cfg.field_scores
    responses = _get(rec, fr, file, row)
    if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
        raise DataError("expected a list of response texts", file=file, row=row, field=fr,
                        reason="bad_type")
    prompt = _get(rec, cfg.field_prompt, file, row)
    if not isinstance(prompt, str):
        prompt = _messages(prompt, file, row, cfg.field_prompt)
    scores = _get(rec, fs, file, row)
    if not isinstance(scores, list):
        raise DataError("expected a list of scores", file=file, row=row, field=fs,
                        reason="bad_type")
    return ranked(prompt, responses, scores, file, row, fs)


def _aspect_mean(annotations: Any, file: str, row: int) -> float | None:
    """Mean of the numeric ``Rating``s of UltraFeedback's per-aspect annotations."""
    if not isinstance(annotations, dict):
        raise DataError("expected a dict of aspects", file=file, row=row, field="annotations",
                        reason="bad_type")
    vals = []
    for aspect in annotations.values():
        rating = aspect.get("Rating") if isinstance(aspect, dict) else None
        try:
            vals.append(float(rating))
        except (TypeError, ValueError):
            continue  # 'N/A'
    return float(np.mean(vals)) if vals else None


def parse_ultrafeedback_ranked(rec, file: str, row: int, cfg) -> RawRanked:
    """openbmb/UltraFeedback: ``instruction`` + rated ``completions`` (module doc)."""
    instruction = _get_str(rec, "instruction", file, row)
    completions = _get(rec, "completions", file, row)
    if not isinstance(completions, list) or not all(isinstance(c, dict) for c in completions):
        raise DataError("expected a list of completion dicts", file=file, row=row,
                        field="completions", reason="bad_type")
    key = "overall_score" if cfg.field_scores in ("", "scores") else cfg.field_scores
    responses, scores = [], []
    for c in completions:
        responses.append(_get_str(c, "response", file, row))
        score = (_aspect_mean(c.get("annotations"), file, row) if key == "annotations"
                 else c.get(key))
        scores.append(score)
    return ranked([{"role": "user", "content": instruction}], responses, scores, file, row,
                  f"completions.{key}")


RANKED_PARSERS = {"generic": parse_ranked_generic, "ultrafeedback": parse_ultrafeedback_ranked}
HUB_NAME = "openbmb/UltraFeedback"


# ----------------------------------------------------------------------------- tokenised lists


def _checked_list(prompt: np.ndarray, responses: list[np.ndarray], scores: list[float],
                  *, end_ids, is_blank, file, row, fields: list[str] | None = None) -> Item:
    """The tokenised list: each response checked as in pairs, duplicates kept once (the
    better-scored copy), at least two left; ``ranks`` recomputed on what is kept."""
    ends = np.asarray(sorted(int(t) for t in end_ids), np.int64)
    if len(prompt) == 0:
        raise DataError("the prompt has no token, so nothing predicts the first response token",
                        file=file, row=row, field="prompt", reason="unscored_first_token")
    kept, seen = [], set()
    for k, r in enumerate(responses):
        scored = check_scored_response(len(prompt), r, ends=ends, is_blank=is_blank, file=file,
                                       row=row, field=fields[k] if fields else
                                       f"responses[{k}]")
        if scored.tobytes() not in seen:
            seen.add(scored.tobytes())
            kept.append(k)
    if len(kept) < 2:
        raise DataError("fewer than two distinct responses (identical texts, or truncation cut "
                        "where they differ: raise data.max_length)", file=file, row=row,
                        field="responses", reason="identical_responses")
    scores_K = np.asarray([scores[k] for k in kept], np.float32)
    return {"prompt": np.asarray(prompt, np.int32),
            "responses": [np.asarray(responses[k], np.int32) for k in kept],
            "scores": scores_K, "ranks": competition_ranks(scores_K)}


def item_responses(item: Item) -> list[np.ndarray]:
    """The responses of a ranked list, an unpaired completion, or a pair."""
    if "responses" in item:
        return list(item["responses"])
    if "completion" in item:
        return [item["completion"]]
    return [item["chosen"], item["rejected"]]


def pair_views(items: list[Item]) -> list[Item]:
    """Pairs as they are; each (prompt, response) of a ranked list or unpaired example as a
    ``{prompt, chosen, rejected}`` view (both the response), so checks written for pairs
    (``checks.check_fits_model``) see every response; a preference tree's branch points
    (``data/tree_data.py``) each as the views of its (history, responses) list."""
    if items and "branch_points" in items[0]:
        items = [{"prompt": bp.history, "responses": bp.responses}
                 for it in items for bp in it["branch_points"]]
    return [view for it in items for view in (
        [it] if "chosen" in it else
        [{"prompt": it["prompt"], "chosen": r, "rejected": r} for r in item_responses(it)])]


# ----------------------------------------------------------------------------- batches


class SlotPipeline(PreferencePipeline):
    """``PreferencePipeline`` with K response slots per item: rows ``[slot 0 of the B items,
    ..., slot K-1]`` (K = 2 for pairs) or, with ``data.prefix_sharing``, one unit per item
    ``[prompt, y_1 .. y_k]`` (``data/prefix.py``; response k of item j scored as slot
    ``k B + j``). A subclass gives each item's prompt and responses (:meth:`unit`) and the
    per-item arrays (:meth:`per_item`). Stored reference log-probs and mixtures are for pairs
    (ValueError)."""

    num_slots = 2

    def __init__(self, items: list[Item], cfg, **kwargs):
        cfg = read_data(cfg)
        if kwargs.get("reference") is not None or kwargs.get("mixture"):
            raise ValueError(f"data.format={cfg.format!r}: stored reference log-probs "
                             "(logprobs.precompute_reference) and mixtures are for pairs")
        super().__init__(items, cfg, **kwargs)

    def _item_lengths(self, items: list[Item]) -> np.ndarray:
        lengths = np.zeros((len(items), 1 + self.num_slots), np.int64)
        for i, it in enumerate(items):
            lengths[i, 0] = len(it["prompt"])
            for k, r in enumerate(item_responses(it)):
                lengths[i, 1 + k] = len(r)
        return lengths

    def _slot_lengths(self, idx: np.ndarray) -> np.ndarray:
        """[K B] slot-major sequence lengths (0 for an empty slot)."""
        lens = self.lengths[idx]
        seq = np.where(lens[:, 1:] > 0, lens[:, :1] + lens[:, 1:], 0)
        return seq.T.reshape(-1)

    def _unit_lengths(self, idx: np.ndarray) -> np.ndarray:
        """What the planner places: the [K B] sequences, or (prefix sharing) the [B] units:
        the prompt's first P - 1 tokens, then per response its restated last prompt token and
        its tokens (``prefix.unit_lengths`` without the empty slots)."""
        seq = self._slot_lengths(idx)
        if not self.prefix_sharing:
            return seq
        seq_BK = seq.reshape(self.num_slots, -1).T
        shared = self.lengths[idx, 0] - 1  # prompts are never empty (checked)
        return shared + np.where(seq_BK > 0, seq_BK - shared[:, None], 0).sum(axis=1)

    def unit(self, idx: np.ndarray, j: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """(prompt, responses in slot order) of the batch's item j."""
        item = self.pairs[int(idx[j])]
        return item["prompt"], item_responses(item)

    def per_item(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {}

    def batch_at(self, epoch: int, position: int) -> dict[str, np.ndarray]:
        idx, weight = self.batch_items(epoch, position)
        B, K = self.global_batch_size, self.num_slots
        plan, r0, r1 = self.plan_rows(idx)
        if self.prefix_sharing:
            units = {j: self.unit(idx, j) for j in range(B) if r0 <= plan.row[j] < r1}
            rows = prefix.materialise(plan, units, r0, r1, self.pad_id)
        else:
            seqs = {}
            for s in range(K * B):
                if r0 <= plan.row[s] < r1:
                    prompt, responses = self.unit(idx, s % B)
                    k = s // B
                    seqs[s] = ((np.concatenate([prompt, responses[k]]), len(prompt))
                               if k < len(responses) else (np.zeros(0, np.int32), 0))
            rows = batching.materialise(plan, seqs, r0, r1, self.pad_id)
        out = self._finish(idx, weight, rows)
        out.update({k: self.host_block(v) for k, v in self.per_item(idx).items()})
        return out


class RankedPipeline(SlotPipeline):
    """Ranked lists as batches (module doc): ``slot_rank`` [B, K] beside the rows."""

    item_name = "ranked lists"

    def __init__(self, items: list[Item], cfg, **kwargs):
        self.num_slots = max(len(it["responses"]) for it in items)
        self._ranks = np.full((len(items), self.num_slots), -1, np.int32)
        for i, it in enumerate(items):
            self._ranks[i, :len(it["ranks"])] = it["ranks"]
        super().__init__(items, cfg, **kwargs)

    def per_item(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        return {"slot_rank": self._ranks[idx]}
