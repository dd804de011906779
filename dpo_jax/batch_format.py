"""Batch formats: which arrays a batch carries and how they are laid out, fixed when a step is
built (not tested key by key inside it).

A :class:`BatchFormat` is a frozen (hashable) description. Its ``kind`` is one of:

* ``pairs``: preference pairs; rows ``[chosen_0..B-1, rejected_0..B-1]`` (K = 2 slots);
* ``ranked``: ranked lists, ``slot_rank`` [B, K]; rows slot-major ``k * B + b``;
* ``unpaired``: KTO's unpaired completions, ``desirable`` [B]; slot 0 the completion, slot 1
  its mismatched KL completion (K = 2);
* ``sequences``: single sequences (SFT text), ``example_weight`` [B], one row each (K = 1);
* ``rollout``: PPO's sampled rows (``tokens`` [B, T] and per-row arrays; K = 1).

Flags: ``packed`` (``seq_index`` [R, L] maps scored tokens to sequence slots: data.packing or
prefix sharing; such rows cannot be split into micro-batches), ``prefix_shared``
(``branch_ids`` [R, L], data.prefix_sharing), ``tree`` (``tree_lo`` / ``tree_hi`` [R, L]:
preference trees, ``dpo_jax.data.trees``; the examples are the trees' branch points),
``stored_reference`` (``ref_logps`` /
``ref_lengths`` [K B], logprobs.precompute_reference). The batch layout itself is
ARCHITECTURE.md's table.
"""

from __future__ import annotations

import dataclasses

import jax

KINDS = ("pairs", "ranked", "unpaired", "sequences", "rollout")
# Arrays indexed by example (leading axis B); every other array of a preference batch is laid out
# slot-major over its K response slots (rows, or [K B] stored reference log-probs).
_PER_EXAMPLE = {"pairs": ("pair_weight",), "ranked": ("pair_weight", "slot_rank"),
                "unpaired": ("pair_weight", "desirable")}
_REQUIRED = {"pairs": ("pair_weight",), "ranked": ("pair_weight", "slot_rank"),
             "unpaired": ("pair_weight", "desirable"), "sequences": ("example_weight",),
             "rollout": ("tokens",)}
_OPTIONAL = (("packed", "seq_index"), ("prefix_shared", "branch_ids"), ("tree", "tree_lo"),
             ("stored_reference", "ref_logps"))


@dataclasses.dataclass(frozen=True)
class BatchFormat:
    """One batch layout (see the module docstring). Raises ValueError for an unknown kind or
    flags the kind cannot carry."""

    kind: str = "pairs"
    packed: bool = False
    prefix_shared: bool = False
    stored_reference: bool = False
    tree: bool = False

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"batch format {self.kind!r}: expected one of {KINDS}")
        if self.prefix_shared and not self.packed:
            raise ValueError("prefix-shared rows carry seq_index: packed must be True")
        if self.tree and not (self.packed and self.kind in ("pairs", "ranked")):
            raise ValueError("preference-tree rows are packed pairs or ranked lists (branch "
                             "points): packed must be True, kind 'pairs' or 'ranked'")
        if self.tree and self.prefix_shared:
            raise ValueError("a batch carries branch_ids (prefix sharing) or tree_lo / tree_hi "
                             "(trees), not both")
        if self.stored_reference and self.kind not in ("pairs", "ranked", "unpaired"):
            raise ValueError(f"{self.kind} batches carry no stored reference log-probs")

    @property
    def preference(self) -> bool:
        """Pairs, ranked lists or unpaired examples (``pair_weight`` [B], K response slots)."""
        return self.kind in _PER_EXAMPLE

    def num_slots(self, batch) -> int:
        """K, the response slots per example: a ranked batch's ``slot_rank`` [B, K] gives it;
        pairs and unpaired examples have 2, single sequences and rollout rows 1."""
        if self.kind == "ranked":
            return batch["slot_rank"].shape[1]
        return 2 if self.preference else 1

    def num_examples(self, batch) -> int:
        """B, the examples of the batch."""
        if self.preference:
            return batch["pair_weight"].shape[0]
        return batch["example_weight" if self.kind == "sequences" else "tokens"].shape[0]

    def seq_index(self, batch):
        """``(seq_index [R, L], number of sequence slots)`` of packed rows, else ``(None,
        None)`` (one sequence per row)."""
        if not self.packed:
            return None, None
        return batch["seq_index"], self.num_slots(batch) * self.num_examples(batch)

    def hidden_kwargs(self, batch) -> dict:
        """Keyword arguments of ``Model.hidden`` the layout adds (prefix sharing's branch ids,
        trees' DFS intervals)."""
        if self.tree:
            return {"tree_BL": (batch["tree_lo"], batch["tree_hi"])}
        return {"branch_ids_BL": batch["branch_ids"]} if self.prefix_shared else {}

    def check(self, batch) -> None:
        """ValueError when ``batch`` does not carry this format's arrays, or carries those of a
        flag that is off (a step built for one layout fed another)."""
        keys = set(batch)
        missing = [k for k in _REQUIRED[self.kind] if k not in keys]
        for flag, key in _OPTIONAL:
            if getattr(self, flag) and key not in keys:
                missing.append(key)
        extra = [key for flag, key in _OPTIONAL if key in keys and not getattr(self, flag)]
        extra += [k for kind, req in _REQUIRED.items() if kind != self.kind and
                  kind in ("ranked", "unpaired") for k in req[1:] if k in keys]
        if missing or extra:
            raise ValueError(f"the step was built for {self}: the batch lacks {missing} and "
                             f"carries {extra} (keys: {sorted(keys)})")

    def split(self, batch, n: int, j):
        """Micro-batch ``j`` of ``n``: examples j, j+n, j+2n, ... (strided, so the rows'
        sharding is kept), each with its K slots. Raises ValueError for packed rows (several
        sequences per row) or n not dividing the examples."""
        if n == 1:
            return batch
        if self.packed:
            raise ValueError("gradient accumulation with packed, prefix-shared or tree "
                             "batches is not supported: set optim.grad_accum=1, or data.packing "
                             "and data.prefix_sharing to False")
        B = self.num_examples(batch)
        if B % n:
            raise ValueError(f"optim.grad_accum={n} must divide the batch's {B} examples")
        K = self.num_slots(batch) if self.preference else 1
        per_example = _PER_EXAMPLE.get(self.kind, ())

        def part(key, x):
            if jax.numpy.ndim(x) == 0:  # a scalar of the whole batch (PPO's kl_coef)
                return x
            lead = () if key in per_example else (K,)
            x = x.reshape(*lead, -1, n, *x.shape[1:])
            x = jax.lax.dynamic_index_in_dim(x, j, axis=len(lead) + 1, keepdims=False)
            return x.reshape(-1, *x.shape[len(lead) + 1:])

        return {k: part(k, v) for k, v in batch.items()}


def infer(batch) -> BatchFormat:
    """The format whose arrays ``batch`` carries: for callers (tests, tools) that build a step
    without naming one; a task names its format (:func:`for_run`)."""
    kind = ("ranked" if "slot_rank" in batch else "unpaired" if "desirable" in batch
            else "pairs" if "pair_weight" in batch else "sequences" if "example_weight" in batch
            else "rollout")
    return BatchFormat(kind, packed="seq_index" in batch, prefix_shared="branch_ids" in batch,
                       stored_reference="ref_logps" in batch, tree="tree_lo" in batch)


def for_run(data, *, stored_reference: bool = False, kind: str | None = None) -> BatchFormat:
    """The format of a run's preference batches: ``data`` is the run's data block (fields
    ``format``, ``packing``, ``prefix_sharing``, ``tree_responses``); ``kind`` overrides
    ``data.format`` (e.g. ``'sequences'`` for SFT text). ``data.format='trees'``: packed tree
    rows of pairs (``tree_responses`` 2) or ranked lists."""
    get = data.get if hasattr(data, "get") else lambda k, d=None: getattr(data, k, d)
    shared = bool(get("prefix_sharing", False))
    if (get("format", "pairs") or "pairs") == "trees" and kind is None:
        # branch points: pairs, or ranked lists of data.tree_responses (plackett_luce)
        return BatchFormat("ranked" if int(get("tree_responses", 2) or 2) > 2 else "pairs",
                           packed=True, tree=True, stored_reference=stored_reference)
    return BatchFormat(kind or get("format", "pairs") or "pairs",
                       packed=bool(get("packing", False)) or shared, prefix_shared=shared,
                       stored_reference=stored_reference)
