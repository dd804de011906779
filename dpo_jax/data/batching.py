"""Tokenised pairs -> fixed-shape numpy batches (the ARCHITECTURE.md "Batches" format).

A batch is built in two steps so that every host agrees on shapes without seeing the others'
tokens: a *plan* (from sequence lengths of the whole global batch only) places each of the 2B
sequences at (row, offset) in an [R, L] grid, then each host *materialises* only its own rows.
Sequence slot s < B is the chosen response of pair s, slot B + s its rejected response.

Shapes come from a handful of choices (length buckets, packed row counts) so XLA compiles few
programs.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from dpo_jax.data.tokenize import TokenPair


def round_up(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)


def pair_lengths(pairs: list[TokenPair]) -> np.ndarray:
    """[N, 3] int: prompt, chosen and rejected lengths."""
    return np.asarray([[len(p["prompt"]), len(p["chosen"]), len(p["rejected"])] for p in pairs],
                      np.int64).reshape(-1, 3)


def parse_buckets(value) -> list[int] | None:
    """``data.buckets``: ``'auto'`` -> None; ``'128,256'`` or a sequence of ints -> sorted unique ints."""
    if isinstance(value, str):
        if value.strip() in ("", "auto"):
            return None
        value = [v for v in value.split(",") if v.strip()]
    out = sorted({int(v) for v in value})
    if not out or out[0] <= 0:
        raise ValueError(f"buckets must be positive lengths, got {value!r}")
    return out


def choose_buckets(batch_max_lengths: np.ndarray, num_buckets: int, multiple: int) -> list[int]:
    """Bucket lengths at evenly spaced quantiles of the per-batch max length.

    The histogram that matters is that of batch maxima, not of single sequences: a batch of B
    pairs is padded to its longest member, so single-sequence quantiles would leave most batches
    in the top bucket. The last bucket always covers the longest batch."""
    a = np.asarray(batch_max_lengths)
    qs = [(i + 1) / num_buckets for i in range(num_buckets)]
    out = {round_up(int(np.ceil(np.quantile(a, q))), multiple) for q in qs}
    out.add(round_up(int(a.max()), multiple))
    return sorted(out)


def pick_bucket(buckets: list[int], length: int) -> int:
    for b in buckets:
        if b >= length:
            return b
    raise ValueError(f"sequence length {length} exceeds the largest bucket {buckets[-1]}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where each of the 2B sequences of a global batch goes; shared by all hosts."""

    rows: int  # R
    length: int  # L
    row: np.ndarray  # [2B] row of slot s
    offset: np.ndarray  # [2B] start column of slot s
    packed: bool  # emit segment ids per sequence and seq_index

    @property
    def cost(self) -> int:
        return self.rows * self.length


def plan_unpacked(seq_lengths: np.ndarray, buckets: list[int], packed: bool = False) -> Plan:
    """One sequence per row, rows padded to the smallest bucket that fits the batch."""
    n = len(seq_lengths)
    length = pick_bucket(buckets, int(seq_lengths.max()))
    return Plan(n, length, np.arange(n), np.zeros(n, np.int64), packed)


def packed_row_choices(num_seqs: int, row_multiple: int) -> list[int]:
    """Allowed packed row counts: k/8 of the 2B sequences, k = 1..8 (rounded up to the row
    multiple). The mean length is stable across batches, so a run compiles one or two."""
    return sorted({round_up(max(1, math.ceil(num_seqs * k / 8)), row_multiple)
                   for k in range(1, 9)})


def plan_packed(seq_lengths: np.ndarray, pack_length: int, row_choices: list[int]) -> Plan:
    """First-fit-decreasing bin packing of sequences into rows of ``pack_length`` tokens."""
    order = np.argsort(-seq_lengths, kind="stable")
    free: list[int] = []
    row = np.zeros(len(seq_lengths), np.int64)
    offset = np.zeros(len(seq_lengths), np.int64)
    for s in order:
        n = int(seq_lengths[s])
        if n > pack_length:
            raise ValueError(f"sequence of {n} tokens exceeds pack_length {pack_length}")
        for r, f in enumerate(free):
            if f >= n:
                break
        else:
            r = len(free)
            free.append(pack_length)
        row[s], offset[s] = r, pack_length - free[r]
        free[r] -= n
    rows = next(c for c in row_choices if c >= len(free))
    return Plan(rows, pack_length, row, offset, True)


def pack_lengths(pack_length: int, pack_length_step: int) -> list[int]:
    """Row lengths the packed planner tries: ``pack_length`` alone (``pack_length_step`` 0), or
    ``pack_length + k * pack_length_step`` for every k >= 0 below ``2 * pack_length``
    (``data.pack_length_step``)."""
    if pack_length_step < 0:
        raise ValueError(f"data.pack_length_step must be >= 0, got {pack_length_step}")
    if not pack_length_step:
        return [pack_length]
    return list(range(pack_length, 2 * pack_length, pack_length_step))


def make_plan(seq_lengths: np.ndarray, buckets: list[int], packing: bool, pack_length: int,
              row_multiple: int, pack_length_step: int = 0) -> Plan:
    """Unpacked plan, or (packing on) the cheapest of one-sequence-per-row and first-fit-
    decreasing rows of each length in :func:`pack_lengths`: the fewest columns (rows x length),
    ties to the shorter rows. Longer rows fill better but cost attention FLOPs quadratic in
    their length, so the candidates stop below twice ``pack_length``."""
    unpacked = plan_unpacked(seq_lengths, buckets, packed=packing)
    if not packing:
        return unpacked
    choices = packed_row_choices(len(seq_lengths), row_multiple)
    plans = [unpacked] + [plan_packed(seq_lengths, n, choices)
                          for n in pack_lengths(pack_length, pack_length_step)]
    return min(plans, key=lambda p: (p.cost, p.length))  # ties: the first (unpacked) wins


def sequences(pairs: list[TokenPair]) -> list[tuple[np.ndarray, int]]:
    """The 2B (tokens, prompt length) sequences: chosen of every pair, then rejected."""
    out = [(np.concatenate([p["prompt"], p["chosen"]]), len(p["prompt"])) for p in pairs]
    out += [(np.concatenate([p["prompt"], p["rejected"]]), len(p["prompt"])) for p in pairs]
    return out


def seq_lengths_of(lengths: np.ndarray) -> np.ndarray:
    """[2B] sequence lengths from [B, 3] pair lengths (chosen slots first)."""
    return np.concatenate([lengths[:, 0] + lengths[:, 1], lengths[:, 0] + lengths[:, 2]])


ROW_KEYS = ("input_ids", "positions", "segment_ids", "loss_mask", "seq_index")


def empty_rows(n_rows: int, length: int, pad_id: int) -> dict[str, np.ndarray]:
    """``n_rows`` rows of ``length`` positions, all padding: ``input_ids`` int32 (``pad_id``),
    ``positions`` and ``segment_ids`` int32 0, ``loss_mask`` float32 0, ``seq_index`` int32 -1
    (ARCHITECTURE.md's layout), for a materialiser to fill."""
    shape = (n_rows, length)
    return {"input_ids": np.full(shape, pad_id, np.int32), "positions": np.zeros(shape, np.int32),
            "segment_ids": np.zeros(shape, np.int32), "loss_mask": np.zeros(shape, np.float32),
            "seq_index": np.full(shape, -1, np.int32)}


def placed_slots(plan: Plan, row_start: int, row_stop: int) -> list[int]:
    """The slots ``plan`` places in rows ``row_start:row_stop``, in row then offset order."""
    slots = [s for s in range(len(plan.row)) if row_start <= plan.row[s] < row_stop]
    return sorted(slots, key=lambda s: (plan.row[s], plan.offset[s]))


def materialise(plan: Plan, seqs: dict[int, tuple[np.ndarray, int]], row_start: int,
                row_stop: int, pad_id: int) -> dict[str, np.ndarray]:
    """Rows ``row_start:row_stop`` of the batch described by ``plan``.

    ``seqs`` maps slot -> (tokens, prompt length) and needs only the slots in those rows.
    ``loss_mask`` is 1 on response tokens (never the first token of a row: nothing predicts it);
    masks come from the plan, never from comparing ids with ``pad_id`` (pad may equal EOS)."""
    out = empty_rows(row_stop - row_start, plan.length, pad_id)
    ids, pos, seg, mask, sidx = (out[k] for k in ROW_KEYS)
    next_seg: dict[int, int] = {}
    for s in placed_slots(plan, row_start, row_stop):
        tokens, p_len = seqs[s]
        r, o, n = int(plan.row[s]) - row_start, int(plan.offset[s]), len(tokens)
        ids[r, o:o + n] = tokens
        pos[r, o:o + n] = np.arange(n)
        next_seg[r] = next_seg.get(r, 0) + 1
        seg[r, o:o + n] = next_seg[r]
        mask[r, o + max(p_len, 1):o + n] = 1.0
        sidx[r, o + max(p_len, 1):o + n] = s
    if not plan.packed:
        del out["seq_index"]
    return out
