"""Prefix-shared rows: each pair's prompt goes through the model once, not once per response.

A pair ``(prompt, y_1 .. y_K)`` (K = 2: chosen, rejected) becomes one *unit* of columns

    [ prompt[:-1] | prompt[-1], y_1 | prompt[-1], y_2 | ... ]
      branch 0      branch 1          branch 2

with positions ``0 .. P-2`` on the shared prompt and ``P-1, P, ...`` on every branch, so each
response sits at the positions it has behind its prompt in the unshared layout. Branch ids
(``branch_ids``: 0 on the prompt, k on response k) make the attention mask inside the jitted
step: the model reads them as the DFS intervals of a preference tree with one branch point
(``dpo_jax.models.layers.branch_tree``, ``block_mask``; the layout equals
``dpo_jax.data.trees``' for that tree, tested): a token sees its own unit's prompt and the
earlier tokens of its own branch, never another branch or unit. Every token then sees exactly
the (token, position) keys it sees in the unshared layout, so per-sequence log-probs agree to
float32 round-off.

Why the last prompt token is restated at the head of each branch: ``loss_mask[r, t]`` scores
token ``t`` from the hidden state at column ``t - 1`` (``dpo_jax.logprobs``), and the first
token of every response is predicted from the last prompt token. With the restated copy (which
sees the prompt before it and itself, as the original does) that convention holds in every
branch, at the cost of one column per extra response. An empty prompt has no shared part;
each branch then starts at position 0 and its first token is not scored (as unshared).

Units are placed by the planner of ``dpo_jax.data.batching`` (one unit per row, or packed
first-fit-decreasing with ``data.packing``); several units in a row get segment ids 1, 2, ...
Every scored token carries its sequence slot in ``seq_index`` (response k = 1..K of pair i ->
``(k - 1) * B + i``: chosen slots first, then rejected, the ``[2B]`` layout of the step).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dpo_jax.data import batching


def unit_lengths(lengths_N3: np.ndarray) -> np.ndarray:
    """[N] columns of each pair's shared unit from ``[N, 1 + K]`` prompt and response lengths:
    ``P - 1 + sum_k (1 + |y_k|)``, or ``sum_k |y_k|`` for an empty prompt."""
    lengths = np.asarray(lengths_N3, np.int64)
    prompt, responses = lengths[:, 0], lengths[:, 1:]
    has_prompt = (prompt > 0).astype(np.int64)
    return (prompt - has_prompt) + (responses + has_prompt[:, None]).sum(axis=1)


def unit_columns(prompt: np.ndarray, responses: list[np.ndarray]):
    """One unit's ``(tokens, positions, branch, scored)`` int32 arrays for a prompt and its K
    responses (scored: 1 on the response tokens, each predicted from the column before it)."""
    n_shared = max(len(prompt) - 1, 0)
    head = prompt[n_shared:]  # the last prompt token, restated at the head of each branch
    parts = [(prompt[:n_shared], 0)] + [(np.concatenate([head, y]), k)
                                        for k, y in enumerate(responses, start=1)]
    tokens = np.concatenate([part for part, _ in parts])
    positions = np.concatenate([np.arange(len(part)) + (n_shared if k else 0)
                                for part, k in parts])
    branch = np.concatenate([np.full(len(part), k) for part, k in parts])
    scored = (branch > 0) & (positions > n_shared)  # a branch's first column is context
    return tuple(a.astype(np.int32) for a in (tokens, positions, branch, scored))


def make_plan(unit_lengths_U: np.ndarray, buckets: list[int], packing: bool, pack_length: int,
              row_multiple: int, pack_length_step: int = 0) -> batching.Plan:
    """Where each of the U units goes: one per row (rows padded to the smallest bucket that fits)
    or, with ``packing``, the cheapest of that and first-fit-decreasing rows of ``pack_length``
    (and the longer rows of ``pack_length_step``: ``batching.make_plan``).
    Always with ``seq_index`` (a row holds two or more sequences)."""
    plan = batching.make_plan(unit_lengths_U, buckets, packing, pack_length, row_multiple,
                              pack_length_step)
    return dataclasses.replace(plan, packed=True)


def materialise(plan: batching.Plan, units: dict[int, tuple[np.ndarray, list[np.ndarray]]],
                row_start: int, row_stop: int, pad_id: int) -> dict[str, np.ndarray]:
    """Rows ``row_start:row_stop`` of the prefix-shared batch described by ``plan``.

    ``units`` maps pair slot i (of the plan's U = B pairs) -> ``(prompt, [y_1 .. y_K])`` and
    needs only the pairs in those rows. Returns the ARCHITECTURE.md keys (``input_ids``,
    ``positions``, ``segment_ids``, ``loss_mask``, ``seq_index``) plus ``branch_ids`` int32
    [rows, L]. Masks come from the plan, never from comparing ids with ``pad_id``."""
    B = len(plan.row)
    rows = batching.empty_rows(row_stop - row_start, plan.length, pad_id)
    ids, pos, seg, mask, sidx = (rows[k] for k in batching.ROW_KEYS)
    branch = np.zeros_like(seg)
    next_seg: dict[int, int] = {}
    for s in batching.placed_slots(plan, row_start, row_stop):
        prompt, responses = units[s]
        tokens, positions, branches, scored = unit_columns(prompt, responses)
        r, o, n = int(plan.row[s]) - row_start, int(plan.offset[s]), len(tokens)
        next_seg[r] = next_seg.get(r, 0) + 1
        cols = slice(o, o + n)
        ids[r, cols], pos[r, cols], branch[r, cols] = tokens, positions, branches
        seg[r, cols] = next_seg[r]
        mask[r, cols] = scored
        sidx[r, cols] = np.where(scored > 0, (branches - 1) * B + s, -1)
    return {"input_ids": ids, "positions": pos, "segment_ids": seg, "branch_ids": branch,
            "loss_mask": mask, "seq_index": sidx}


def layout(pairs: list, pad_id: int, buckets: list[int] | None = None, packing: bool = False,
           pack_length: int = 0, row_multiple: int = 1,
           pack_length_step: int = 0) -> dict[str, np.ndarray]:
    """The whole prefix-shared batch of ``pairs`` (``{"prompt", "chosen", "rejected"}``) on one
    host: plan and materialise in one call (tests, benchmarks). ``buckets`` None: the longest
    unit; ``pack_length`` 0: the largest bucket."""
    lengths = batching.pair_lengths(pairs)
    units_U = unit_lengths(lengths)
    buckets = buckets or [int(units_U.max())]
    plan = make_plan(units_U, buckets, packing, pack_length or buckets[-1], row_multiple,
                     pack_length_step)
    units = {i: (p["prompt"], [p["chosen"], p["rejected"]]) for i, p in enumerate(pairs)}
    return materialise(plan, units, 0, plan.rows, pad_id)
