"""Preference-tree data (``data.format='trees'``, issue 31): rows -> branch points -> tokenised
trees -> batches (``dpo_jax.data.trees`` lays a tree out; this module reads, tokenises and
batches them).

Row forms (docs/data.md, "Preference trees"), from local files or the hub like every source
(``data.source='generic'``, ``data.path``):

* **conversation** (a row with ``data.field_messages``, default ``messages``): a list of
  ``{role, content}`` messages in which an assistant message may carry ``rejected`` (a text,
  or a list of texts ranked below ``content``, best first) and ``weight`` (>= 0, default 1).
  Each such message is a branch point: its history is every message before it (earlier
  assistant turns with their ``content``, the chosen answer that continued the conversation),
  its responses ``content`` (rank 0) and the rejected texts (ranks 1, 2, ...). A row without a
  branch point is a bad row (reason ``no_branch_point``).
* **Step-DPO** (Lai et al. 2024, the columns of their ``Math-Step-DPO-10K``): ``prompt`` (text or
  messages), ``initial_reason_steps`` (``data.field_steps``; the shared step prefix, may be
  empty), ``chosen`` and ``rejected`` (the preferred and dispreferred next step). Each row is a
  branch point whose history is the prompt (a message list rendered with the generation
  prompt) followed by the step prefix text; rows of one file with the same prompt form one
  tree, so their common prompt and steps run once.

Tokenisation: each branch point is the ranked list ``(history, responses)`` under the rules of
pairs (``tokenize.PairTokenizer.encode_lists``: boundary, BOS once, one end token per response,
the template's turn end for chat, truncation) and the checks of ranked lists
(``ranked._checked_list``); a bad branch point names file, row and field (``messages[3].content``,
``messages[3].rejected[0]``, ``chosen``). With ``on_bad_row='skip'`` a conversation row with a
bad branch point is dropped whole; a Step-DPO row is its own branch point. The tokens of a
branch point are therefore exactly those of the same pair trained unrolled; the tree only
shares what their token sequences have in common (``trees.build``).

Weights: a branch point's weight is its row's ``weight`` (``data.weight_field``), times its
message's ``weight``, times ``data.tree_depth_decay ** depth`` (depth: its index among the
row's branch points, 0 first; Step-DPO rows: their order in the tree).

Batches (:class:`TreePipeline`): ``global_batch_size`` trees per batch, packed or one per row,
and ``B = global_batch_size * max_branch_points`` branch-point slots (the most branch points
of any tree of the split, so every batch has one shape); slots a tree does not fill have
weight 0. Beside the rows (``trees.materialise``): ``pair_weight`` [B] (the branch points'
weights), ``bp_depth`` int32 [B] (eval's per-depth metrics), and ``slot_rank`` [B, K] for
Plackett-Luce (K = ``data.tree_responses``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from typing import Any

import numpy as np

from dpo_jax.data import trees
from dpo_jax.data.errors import BadRows, DataError
from dpo_jax.data.pipeline import PreferencePipeline
from dpo_jax.data.ranked import PromptItem, _checked_list
from dpo_jax.data.sources import Message, _get, _get_str, _messages

log = logging.getLogger("dpo_jax.data")


@dataclasses.dataclass
class RawBranchPoint(PromptItem):
    """One branch point before tokenisation: ``prompt`` its history (messages, or text),
    ``responses`` best first, ``fields`` their names in the row (errors), ``chat``: a text
    history that is a rendered chat (responses end with the template's turn end)."""

    prompt: str | list[Message]
    responses: list[str]
    fields: list[str]
    file: str = ""
    row: int = -1
    weight: float = 1.0  # the row's weight (data.weight_field)
    scale: float = 1.0  # the message's weight times data.tree_depth_decay ** depth
    depth: int = 0
    tree: int = -1  # index of its tree among the split's rows
    chat: bool = False
    group_key: str = ""  # the tree's root prompt: eval is carved by it (sources.prompt_key)

    @property
    def is_chat(self) -> bool:
        return self.chat or isinstance(self.prompt, list)


def _weight(value: Any, file: str, row: int, field: str) -> float:
    try:
        w = float(value)
    except (TypeError, ValueError):
        w = float("nan")
    if not math.isfinite(w) or w < 0:
        raise DataError(f"weight must be a finite number >= 0, got {value!r}", file=file,
                        row=row, field=field, reason="bad_weight")
    return w


def parse_conversation(rec, file: str, row: int, cfg) -> list[RawBranchPoint]:
    """The branch points of one conversation row (module doc). Raises DataError naming the
    field for a malformed message list, a bad ``rejected`` or ``weight``, or no branch point."""
    field = cfg.field_messages
    raw = _get(rec, field, file, row)
    msgs = _messages(raw, file, row, field)
    out: list[RawBranchPoint] = []
    for i, (m, full) in enumerate(zip(msgs, raw)):
        if "rejected" not in full or full["rejected"] is None:
            continue
        where = f"{field}[{i}]"
        if m["role"] != "assistant":
            raise DataError("only assistant messages carry rejected alternatives", file=file,
                            row=row, field=f"{where}.rejected", reason="bad_format")
        rej = full["rejected"]
        rej = [rej] if isinstance(rej, str) else rej
        if not isinstance(rej, list) or not rej or not all(isinstance(r, str) for r in rej):
            raise DataError("rejected must be a text or a non-empty list of texts", file=file,
                            row=row, field=f"{where}.rejected", reason="bad_type")
        weight = _weight(full.get("weight", 1.0), file, row, f"{where}.weight")
        names = [f"{where}.content"] + ([f"{where}.rejected"] if isinstance(
            full["rejected"], str) else [f"{where}.rejected[{k}]" for k in range(len(rej))])
        out.append(RawBranchPoint(msgs[:i], [m["content"]] + list(rej), names, file, row,
                                  scale=weight * cfg.tree_depth_decay ** len(out),
                                  depth=len(out)))
    if not out:
        raise DataError(f"no assistant message of {field} carries 'rejected': the row has no "
                        "branch point", file=file, row=row, field=field,
                        reason="no_branch_point")
    first_user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), 0)
    key = json.dumps(msgs[:first_user + 1])
    for p in out:
        p.group_key = key
    return out


def parse_step(rec, file: str, row: int, cfg) -> list[RawBranchPoint]:
    """One Step-DPO row as a branch point (module doc); its depth is set when rows are grouped
    into trees."""
    prompt = _get(rec, cfg.field_prompt, file, row)
    if isinstance(prompt, list):
        prompt = _messages(prompt, file, row, cfg.field_prompt)
    elif not isinstance(prompt, str):
        raise DataError("expected a text or a list of messages", file=file, row=row,
                        field=cfg.field_prompt, reason="bad_type")
    steps = rec.get(cfg.field_steps, "") if hasattr(rec, "get") else ""
    if steps is None:
        steps = ""
    if not isinstance(steps, str):
        raise DataError("expected a text", file=file, row=row, field=cfg.field_steps,
                        reason="bad_type")
    chosen = _get_str(rec, cfg.field_chosen, file, row)
    rejected = _get_str(rec, cfg.field_rejected, file, row)
    return [_StepPoint(prompt, [chosen, rejected], [cfg.field_chosen, cfg.field_rejected], file,
                       row, group_key=json.dumps(prompt), steps=steps)]


@dataclasses.dataclass
class _StepPoint(RawBranchPoint):
    steps: str = ""


def parse_tree_row(rec, file: str, row: int, cfg) -> list[RawBranchPoint]:
    """A row's branch points: the conversation form when the row has ``data.field_messages``,
    else the Step-DPO form."""
    has = (lambda k: k in rec) if hasattr(rec, "__contains__") else (lambda k: False)
    if has(cfg.field_messages):
        return parse_conversation(rec, file, row, cfg)
    return parse_step(rec, file, row, cfg)


def group_trees(points: list[RawBranchPoint]) -> list[list[RawBranchPoint]]:
    """Branch points -> trees: a conversation row's branch points form its tree; Step-DPO rows
    of one file with the same prompt form one tree (in file order; depth = that order)."""
    out: list[list[RawBranchPoint]] = []
    by_prompt: dict[tuple, int] = {}
    for p in points:
        if isinstance(p, _StepPoint):
            key = (p.file, repr(p.prompt))
            if key not in by_prompt:
                by_prompt[key] = len(out)
                out.append([])
            out[by_prompt[key]].append(p)
        elif out and out[-1] and out[-1][-1].file == p.file and out[-1][-1].row == p.row \
                and not isinstance(out[-1][-1], _StepPoint):
            out[-1].append(p)
        else:
            out.append([p])
    return out


def _step_history(encoder, p: _StepPoint):
    """A Step-DPO point's history as text: the prompt (a message list rendered with the
    generation prompt) followed by the step prefix."""
    if isinstance(p.prompt, list):
        return encoder._render(p.prompt, True) + p.steps, True
    return p.prompt + p.steps, False


def encode_trees(encoder, raw_trees: list[list[RawBranchPoint]], bad: BadRows, decay: float
                 ) -> list[dict]:
    """Tokenised trees (module doc): every branch point through ``encoder.encode_lists`` and
    ``ranked._checked_list``; a conversation tree with a bad branch point is dropped whole
    (``bad`` raises or counts), a Step-DPO tree loses that branch point. ``decay``:
    ``data.tree_depth_decay`` for Step-DPO trees (conversations apply it when parsed). Returns
    ``[{"branch_points": [trees.BranchPoint]}]``, each weight the row's times its scale."""
    flat: list[RawBranchPoint] = []
    for t, points in enumerate(raw_trees):
        for d, p in enumerate(points):
            if isinstance(p, _StepPoint):
                text, chat = _step_history(encoder, p)
                p = dataclasses.replace(p, prompt=text, chat=chat, depth=d, scale=decay ** d)
            flat.append(dataclasses.replace(p, tree=t))
    checked: dict[int, dict] = {}

    def check(prompt, responses, item):
        out = _checked_list(prompt, responses, [-float(k) for k in range(len(responses))],
                            end_ids=encoder.end_ids, is_blank=encoder.is_blank,
                            file=item.file, row=item.row, fields=item.fields)
        checked[id(item)] = out

    _, kept_at = encoder.encode_lists(flat, bad, check)
    kept = set(kept_at)
    out: dict[int, list[trees.BranchPoint]] = {}
    dropped: set[int] = set()
    for i, p in enumerate(flat):
        if i not in kept:
            if not isinstance(p, _StepPoint):
                dropped.add(p.tree)
            continue
        c = checked[id(p)]
        out.setdefault(p.tree, []).append(trees.BranchPoint(
            c["prompt"], list(c["responses"]), [int(r) for r in c["ranks"]],
            p.weight * p.scale, p.depth))
    return [{"branch_points": out[t]} for t in sorted(out) if t not in dropped]


# ------------------------------------------------------------------------------ batches


class TreePipeline(PreferencePipeline):
    """Preference trees as batches (module doc). ``items``: a split's trees, each
    ``{"branch_points": [trees.BranchPoint]}`` (``encode_trees``); ``reference``: ``(logps [N_bp, K], lengths
    [N_bp, K])`` per branch point in tree order (K = 2: pairs), or None."""

    item_name = "trees"

    def __init__(self, items: list[dict], cfg, **kwargs):
        if not items or any(not t["branch_points"] for t in items):
            raise ValueError("TreePipeline needs trees with at least one branch point each")
        self.built = [trees.build(t["branch_points"]) for t in items]
        self.units = [trees.columns(t) for t in self.built]
        bps = [t["branch_points"] for t in items]
        self.max_bp = max(len(t) for t in bps)
        self.num_responses = int(getattr(cfg, "tree_responses", 2) or 2)
        most = max(len(bp.responses) for t in bps for bp in t)
        if most > self.num_responses:
            raise DataError(f"a branch point has {most} responses > data.tree_responses "
                            f"{self.num_responses}: raise data.tree_responses (K-way branch "
                            "points train with loss plackett_luce)", reason="too_many_responses")
        first = np.cumsum([0] + [len(t) for t in bps])
        self._first_bp = first[:-1]
        reference = kwargs.pop("reference", None)
        super().__init__(items, cfg, **kwargs)
        self.reference = None
        if reference is not None:
            logps, lengths = (np.asarray(a, np.float32) for a in reference)
            want = (int(first[-1]), self.num_responses)
            if logps.shape != want or lengths.shape != want:
                raise ValueError(f"tree reference log-probs have shapes {logps.shape}, "
                                 f"{lengths.shape}; want {want}: one row per branch point")
            self.reference = (logps, lengths)

    def _item_lengths(self, items) -> np.ndarray:
        """[N, 3]: each tree's unit length in column 0 (what the planner and
        ``group_by_length`` read), zeros beside it."""
        out = np.zeros((len(items), 3), np.int64)
        out[:, 0] = [len(u["tokens"]) for u in self.units]
        return out

    def _unit_lengths(self, idx: np.ndarray) -> np.ndarray:
        return self.lengths[idx, 0]

    def plan_rows(self, idx: np.ndarray):
        plan = trees.make_plan(self._unit_lengths(idx), self.buckets, bool(self.cfg.packing),
                               self.pack_length, self.row_multiple,
                               int(self.cfg.pack_length_step))
        return (plan, *self.host_rows(plan.rows))

    def batch_at(self, epoch: int, position: int) -> dict[str, np.ndarray]:
        idx, weight = self.batch_items(epoch, position)
        plan, r0, r1 = self.plan_rows(idx)
        B = len(idx) * self.max_bp
        units = {s: self.units[int(idx[s])] for s in range(len(idx)) if r0 <= plan.row[s] < r1}
        first = np.arange(len(idx)) * self.max_bp
        out = trees.materialise(plan, units, first, B, r0, r1, self.pad_id)
        K = self.num_responses
        pw = np.zeros(B, np.float32)
        depth = np.zeros(B, np.int32)
        rank = -np.ones((B, K), np.int32)
        ref = np.zeros((2, K, B), np.float32)
        for s, i in enumerate(idx):
            for j, bp in enumerate(self.items_of(int(i))):
                b = s * self.max_bp + j
                pw[b] = weight[s] * bp.weight
                depth[b] = bp.depth
                rank[b, :len(bp.responses)] = bp.ranks
                if self.reference is not None:
                    n = self._first_bp[int(i)] + j
                    ref[0, :, b], ref[1, :, b] = self.reference[0][n], self.reference[1][n]
        out["pair_weight"] = self.host_block(pw)
        out["bp_depth"] = self.host_block(depth)
        if K > 2:
            out["slot_rank"] = self.host_block(rank)
        if self.reference is not None:
            out["ref_logps"] = self.host_block(ref[0].reshape(-1))
            out["ref_lengths"] = self.host_block(ref[1].reshape(-1))
        return out

    def items_of(self, i: int) -> list[trees.BranchPoint]:
        return self.pairs[i]["branch_points"]

    @property
    def stats(self) -> dict[str, Any]:
        """The pipeline's stats plus the trees': branch points, max per tree, and the columns of
        the tree units against the same branch points unrolled into independent sequences."""
        out = super().stats
        bps = [bp for i in range(len(self.pairs)) for bp in self.items_of(i)]
        unrolled = sum(len(bp.history) * len(bp.responses) + sum(map(len, bp.responses))
                       for bp in bps)
        columns = int(self.lengths[:, 0].sum())
        out.update(num_trees=len(self.pairs), branch_points=len(bps),
                   max_branch_points=self.max_bp, tree_columns=columns,
                   unrolled_columns=int(unrolled),
                   columns_saved_fraction=1.0 - columns / max(unrolled, 1))
        return out


def unrolled_pairs(items: list[dict]) -> list[dict[str, np.ndarray]]:
    """The branch points of trees ``items`` (``{"branch_points": [...]}``) as independent pairs
    ``{prompt: history, chosen, rejected}`` with their full histories, tree by tree (the order
    of ``TreePipeline(reference=...)``'s rows). Raises ValueError for a branch point with other
    than two responses (Plackett-Luce trees have no pair form)."""
    out = []
    for t in items:
        for bp in t["branch_points"]:
            if len(bp.responses) != 2:
                raise ValueError(f"a branch point has {len(bp.responses)} responses: only "
                                 "binary branch points unroll into pairs")
            out.append({"prompt": bp.history, "chosen": bp.responses[0],
                        "rejected": bp.responses[1]})
    return out


def branch_point_lengths(items: list[dict]) -> dict[str, Any]:
    """Length summary of the trees (histories, responses, tree units) for the data stats."""
    bps = [t["branch_points"] for t in items]
    hist = np.asarray([len(bp.history) for t in bps for bp in t])
    resp = np.asarray([len(r) for t in bps for bp in t for r in bp.responses])
    cols = np.asarray([trees.unit_length(trees.build(t)) for t in bps])
    summary = lambda a: {"mean": float(a.mean()), "p50": int(np.percentile(a, 50)),  # noqa
                         "p90": int(np.percentile(a, 90)), "max": int(a.max())}
    return {"history": summary(hist), "response": summary(resp), "tree": summary(cols)}


