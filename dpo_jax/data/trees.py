"""Preference trees: every branch point of a conversation (or of a reasoning chain) a preference
pair or ranked list, all of a tree's branch points in one forward (issue 31).

A tree is given by its *branch points*: each a token history ``H`` (the conversation up to an
assistant turn, or a prompt and the reasoning steps so far) and K >= 2 alternative responses
``R_1 .. R_K`` (best first, with their ranks), tokenised exactly as the pair or ranked list
``(H, R_1 .. R_K)`` would be (``dpo_jax.data.tokenize``). Unrolled, each branch point is an
independent pair (K = 2) or list with its full history; here the histories of a tree share their
common tokens and each token is run through the model once.

Building (:func:`build`): the sequences ``H_i`` (context) and ``H_i + R_ik`` (response tokens
scored for slot ``(i, k)``) are inserted into a token trie, histories first. A sequence walks
along existing tokens while they match and, on its response part, only through tokens that no
other sequence scores, so each token is scored for at most one slot; otherwise it branches off.
A chosen turn that the next history repeats is therefore scored on the shared path (scored and
context at once), and siblings that start alike still get their own tokens. Nodes are maximal
runs of tokens: every inner node has two or more children.

Layout (:func:`columns`): nodes in depth-first order (ancestors before descendants). As in
prefix sharing (``dpo_jax.data.prefix``, a tree with one branch point), an inner node's last
token is restated at the head of each child, so that the first token of every child is
predicted from the column right before it (``loss_mask[t]`` scores token ``t`` from the hidden
state at ``t - 1``): the head copy in the first child keeps that token's slot (it directly
follows the parent's other tokens), later copies are context. Positions continue along each
root-to-node path (a token's position is its index in its sequences). Each column carries its
node's DFS interval ``(tree_lo, tree_hi)``: the node's pre-order index and the largest
pre-order index in its subtree, from which the attention mask follows
(``dpo_jax.models.layers.block_mask``: a token sees its segment's earlier columns on its own
root path, nothing in sibling branches). Every token then sees exactly the (token, position)
keys it sees in its unrolled sequence, so per-branch-point log-probs equal the unrolled pairs'
to float32 round-off.

Batches (:func:`materialise`): trees are units placed by the planner of
``dpo_jax.data.batching`` (one per row, or packed first-fit-decreasing); the branch points of a
batch are numbered ``b = 0 .. B - 1`` (tree by tree, with weight-0 padding slots) and response
k of branch point b has sequence slot ``k * B + b`` (slot-major, the ``[2B]`` pairs layout and
the ``[K B]`` ranked layout of the step), so the pair and list losses read branch points as
they read pairs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from dpo_jax.data import batching


@dataclasses.dataclass
class BranchPoint:
    """One branch point of a tree: ``history`` int32 tokens, ``responses`` int32 tokens each
    (K >= 2, best first), ``rank`` their competition ranks (pairs: ``[0, 1]``), ``weight`` the
    loss weight of this branch point and ``depth`` its turn (or step) index along its path, 0
    at the first branch point (per-depth metrics)."""

    history: np.ndarray
    responses: list[np.ndarray]
    rank: list[int] | None = None
    weight: float = 1.0
    depth: int = 0

    @property
    def ranks(self) -> list[int]:
        return list(range(len(self.responses))) if self.rank is None else list(self.rank)


@dataclasses.dataclass
class _Node:
    tokens: list[int]
    slots: list[int]  # per token: the scored slot's index into Tree.slot_ids, or -1
    start: int  # position of tokens[0]
    children: list["_Node"] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Tree:
    """A built tree: its root node and the slots ``(branch point, response)`` its tokens score,
    with the branch points themselves."""

    root: _Node
    slot_ids: list[tuple[int, int]]
    branch_points: list[BranchPoint]


def _insert(root: _Node, seq: np.ndarray, scored_from: int, slot: int) -> None:
    """Walk ``seq`` into the trie below ``root``; tokens from index ``scored_from`` on are scored
    for ``slot`` (-1: none) and may only share tokens no other sequence scores."""
    node, j, pos = root, 0, 0
    n = len(seq)
    while pos < n:
        tok, scored = int(seq[pos]), pos >= scored_from and slot >= 0
        if j < len(node.tokens):
            if node.tokens[j] == tok and not (scored and node.slots[j] >= 0):
                if scored:
                    node.slots[j] = slot
                pos, j = pos + 1, j + 1
                continue
            # diverge inside the node: split it at j (the tail keeps the children)
            tail = _Node(node.tokens[j:], node.slots[j:], node.start + j, node.children)
            node.tokens, node.slots, node.children = node.tokens[:j], node.slots[:j], [tail]
        elif not node.children and node is not root and node.tokens:
            # a leaf is extended, not given a single child (nodes are maximal runs)
            node.tokens.append(tok)
            node.slots.append(slot if scored else -1)
            pos, j = pos + 1, j + 1
            continue
        else:
            nxt = next((c for c in node.children if c.tokens[0] == tok
                        and not (scored and c.slots[0] >= 0)), None)
            if nxt is not None:
                node, j = nxt, 0
                continue
        rest = [int(t) for t in seq[pos:]]
        node.children.append(_Node(rest, [slot if p >= scored_from and slot >= 0 else -1
                                          for p in range(pos, n)], pos))
        return


def build(branch_points: list[BranchPoint]) -> Tree:
    """The trie of a tree's branch points (module doc): histories first, then each response.

    Raises ValueError for a branch point with fewer than two responses or an empty response."""
    root = _Node([], [], 0)
    slot_ids: list[tuple[int, int]] = []
    for i, bp in enumerate(branch_points):
        if len(bp.responses) < 2:
            raise ValueError(f"branch point {i} has {len(bp.responses)} responses; need >= 2")
        if any(len(r) == 0 for r in bp.responses):
            raise ValueError(f"branch point {i} has an empty response")
        _insert(root, np.asarray(bp.history), len(bp.history), -1)
    for i, bp in enumerate(branch_points):
        for k, resp in enumerate(bp.responses):
            slot_ids.append((i, k))
            seq = np.concatenate([np.asarray(bp.history, np.int64), np.asarray(resp, np.int64)])
            _insert(root, seq, len(bp.history), len(slot_ids) - 1)
    return Tree(root, slot_ids, list(branch_points))


def columns(tree: Tree) -> dict[str, np.ndarray]:
    """One tree's columns in DFS order (module doc), int32 arrays of one length:
    ``tokens``, ``positions``, ``tree_lo``, ``tree_hi``, ``scored`` (1 on scored tokens),
    ``branch_point`` and ``response`` (the slot of a scored token, -1 elsewhere)."""
    out: dict[str, list[int]] = {k: [] for k in ("tokens", "positions", "tree_lo", "tree_hi",
                                                 "slot")}
    counter = [0]

    def emit(tokens, positions, slots, lo, hi):
        out["tokens"] += tokens
        out["positions"] += positions
        out["slot"] += slots
        out["tree_lo"] += [lo] * len(tokens)
        out["tree_hi"] += [hi] * len(tokens)

    def visit(node: _Node, head: tuple[int, int, int] | None) -> None:
        """``head``: (token, position, slot) restated from the parent, or None."""
        lo = counter[0]
        counter[0] += 1
        start = len(out["tokens"])
        toks, poss, slots = [], [], []
        if head is not None:
            toks, poss, slots = [head[0]], [head[1]], [head[2]]
        keep = len(node.tokens) - 1 if node.children and node.tokens else len(node.tokens)
        toks += node.tokens[:keep]
        poss += list(range(node.start, node.start + keep))
        slots += node.slots[:keep]
        emit(toks, poss, slots, lo, -1)
        for c, child in enumerate(node.children):
            last = None  # the root has no tokens: its children start their paths
            if node.tokens:
                last = (node.tokens[-1], node.start + len(node.tokens) - 1,
                        node.slots[-1] if c == 0 else -1)
            visit(child, last)
        hi = counter[0] - 1
        for t in range(start, start + len(toks)):
            out["tree_hi"][t] = hi

    visit(tree.root, None)
    arr = {k: np.asarray(v, np.int32) for k, v in out.items()}
    # a token at position 0 has nothing to be predicted from: never scored (as unrolled rows)
    arr["slot"] = np.where(arr["positions"] > 0, arr["slot"], -1).astype(np.int32)
    ids = np.asarray(tree.slot_ids, np.int32).reshape(-1, 2)
    slot = arr.pop("slot")
    arr["scored"] = (slot >= 0).astype(np.int32)
    arr["branch_point"] = np.where(slot >= 0, ids[slot, 0] if len(ids) else -1, -1).astype(np.int32)
    arr["response"] = np.where(slot >= 0, ids[slot, 1] if len(ids) else -1, -1).astype(np.int32)
    return arr


def unit_length(tree: Tree) -> int:
    """Columns of the tree's unit (:func:`columns`), without laying it out: every node's tokens
    plus one restated head per node below a node that has tokens."""

    def count(node: _Node, has_head: bool) -> int:
        return len(node.tokens) - (1 if node.children and node.tokens else 0) + has_head + sum(
            count(c, bool(node.tokens)) for c in node.children)

    return count(tree.root, False)


def make_plan(unit_lengths_U: np.ndarray, buckets: list[int], packing: bool, pack_length: int,
              row_multiple: int, pack_length_step: int = 0) -> batching.Plan:
    """Where each of the U trees goes (as ``prefix.make_plan``): always with ``seq_index``."""
    plan = batching.make_plan(np.asarray(unit_lengths_U), buckets, packing, pack_length,
                              row_multiple, pack_length_step)
    return dataclasses.replace(plan, packed=True)


ROW_KEYS = batching.ROW_KEYS + ("tree_lo", "tree_hi")


def materialise(plan: batching.Plan, units: dict[int, dict[str, np.ndarray]],
                first_slot: np.ndarray, num_slots: int, row_start: int, row_stop: int,
                pad_id: int) -> dict[str, np.ndarray]:
    """Rows ``row_start:row_stop`` of the tree batch described by ``plan``.

    ``units`` maps tree slot u -> its :func:`columns` (only the trees in those rows are
    needed), ``first_slot`` [U] the batch's branch-point slot of each tree's first branch point
    and ``num_slots`` B the batch's branch-point slots: response k of branch point i of tree u
    is sequence slot ``k * B + first_slot[u] + i``. Returns ARCHITECTURE.md's keys plus
    ``tree_lo`` and ``tree_hi`` int32 [rows, L] (padding: 0, its own one-node tree)."""
    rows = batching.empty_rows(row_stop - row_start, plan.length, pad_id)
    rows["tree_lo"] = np.zeros_like(rows["segment_ids"])
    rows["tree_hi"] = np.zeros_like(rows["segment_ids"])
    next_seg: dict[int, int] = {}
    for u in batching.placed_slots(plan, row_start, row_stop):
        c = units[u]
        r, o, n = int(plan.row[u]) - row_start, int(plan.offset[u]), len(c["tokens"])
        next_seg[r] = next_seg.get(r, 0) + 1
        cols = slice(o, o + n)
        rows["input_ids"][r, cols] = c["tokens"]
        rows["positions"][r, cols] = c["positions"]
        rows["segment_ids"][r, cols] = next_seg[r]
        rows["tree_lo"][r, cols], rows["tree_hi"][r, cols] = c["tree_lo"], c["tree_hi"]
        rows["loss_mask"][r, cols] = c["scored"]
        rows["seq_index"][r, cols] = np.where(
            c["scored"] > 0, c["response"] * num_slots + first_slot[u] + c["branch_point"], -1)
    return rows


def layout(trees: list[Tree], pad_id: int, num_slots: int | None = None,
           buckets: list[int] | None = None, packing: bool = False, pack_length: int = 0,
           row_multiple: int = 1, pack_length_step: int = 0) -> dict[str, np.ndarray]:
    """The whole batch of ``trees`` on one host (tests, benchmarks): branch points numbered tree
    by tree; ``num_slots`` None: their number. Adds ``bp_index`` [B] (tree, branch point) pairs
    as an int32 [B, 2] array (-1 on padding slots)."""
    units = {u: columns(t) for u, t in enumerate(trees)}
    lengths = np.asarray([len(c["tokens"]) for c in units.values()])
    counts = np.asarray([len(t.branch_points) for t in trees])
    first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    B = int(counts.sum()) if num_slots is None else int(num_slots)
    buckets = buckets or [int(lengths.max())]
    plan = make_plan(lengths, buckets, packing, pack_length or buckets[-1], row_multiple,
                     pack_length_step)
    out = materialise(plan, units, first, B, 0, plan.rows, pad_id)
    index = -np.ones((B, 2), np.int32)
    for u, t in enumerate(trees):
        for i in range(len(t.branch_points)):
            index[first[u] + i] = (u, i)
    out["bp_index"] = index
    return out
