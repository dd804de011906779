"""Length bounds of every batch layout at ``bucket_multiple=1``, against lengths computed here.

Layouts: pairs, packed pairs, ranked lists (K slots, empty slots included), unpaired examples
(the completion and the mismatched KL completion, cut to ``max_length``), prefix-shared units
(pairs, ranked lists, unpaired) and packed prefix-shared units. With bucket rounding 1 (and one
auto bucket) a bound one too large shows as a row one column too long and a bound one too
small as a unit that does not fit; the default rounding to 16 hides both unless the longest
unit sits exactly at a multiple.

Independent lengths (from the layouts' definitions in ARCHITECTURE.md and ``data/prefix.py``):
a sequence is ``prompt + response``; an unpaired KL sequence is the prompt with its KL
partner's completion (``kl_partner``: never its own) cut to ``max(max_length - prompt, 1)``
tokens; a prefix-shared unit is
``prompt - 1 + sum_k (1 + response_k)`` over the real responses.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dpo_jax.data import batching, ranked, unpaired
from dpo_jax.data.pipeline import PreferencePipeline
from tests import helpers

ML = 40  # data.max_length of every case


def toks(n, start=1):
    return (np.arange(n, dtype=np.int32) % 97) + start


def pair(p, c, r):
    return {"prompt": toks(p), "chosen": toks(c, 3), "rejected": toks(r, 5)}


def ranked_item(p, lens):
    k = len(lens)
    return {"prompt": toks(p), "responses": [toks(n, 2 + i) for i, n in enumerate(lens)],
            "scores": np.arange(k, 0, -1).astype(np.float32), "ranks": np.arange(k, dtype=np.int32)}


def unpaired_item(p, c, good=True, start=3):
    return {"prompt": toks(p), "completion": toks(c, start), "desirable": good}


# ------------------------------------------------------------------ independent lengths


def responses(it):
    if "responses" in it:
        return [len(r) for r in it["responses"]]
    if "completion" in it:
        return [len(it["completion"])]
    return [len(it["chosen"]), len(it["rejected"])]


def kl_partner(items, idx, j, max_length=ML):
    """The KL partner rule of ``data/unpaired.py`` written out: the nearest previous example of
    the batch (cyclically) whose completion, cut to the KL slot's ``max(max_length - prompt,
    1)`` tokens, differs from example j's own completion; else the nearest previous item of
    the split (eval padding, -1, reads item 0)."""
    idx = [int(i) if i >= 0 else 0 for i in idx]
    i = idx[j]
    own = items[i]["completion"]
    keep = max(max_length - len(items[i]["prompt"]), 1)
    B, N = len(idx), len(items)
    for c in [idx[(j - k) % B] for k in range(1, B)] + [(i - k) % N for k in range(1, N)]:
        if not np.array_equal(items[c]["completion"][:keep], own):
            return c
    raise AssertionError(f"item {i}: no mismatched completion")


def units(fmt, prefix, items, idx, max_length=ML):
    """The lengths of what one batch of items ``idx`` places (nonzero only, any order)."""
    its = [items[i] for i in idx]
    out = []
    for j, it in enumerate(its):
        p, ys = len(it["prompt"]), responses(it)
        if fmt == "unpaired":  # + its KL partner's completion, cut to max_length
            other = len(items[kl_partner(items, idx, j, max_length)]["completion"])
            ys = ys + [min(other, max(max_length - p, 1))]
        if prefix:
            out.append(p - 1 + sum(1 + y for y in ys))
        else:
            out += [p + y for y in ys]
    return sorted(out)


def worst_unit(fmt, prefix, items, max_length=ML):
    """The longest unit any batch can hold: every unit (pairs, lists), or every prompt with
    every other example's completion (unpaired: which examples meet changes with the epoch)."""
    if fmt != "unpaired":
        return max(units(fmt, prefix, items, [i])[-1] for i in range(len(items)))
    return max(max(units(fmt, prefix, items, [j, i], max_length))
               for i, j in itertools.permutations(range(len(items)), 2))


def segment_lengths(batch):
    """Lengths of every placed unit: the runs of one segment id in a row."""
    seg = batch["segment_ids"]
    return sorted(int((row == s).sum()) for row in seg for s in range(1, int(row.max()) + 1))


# ------------------------------------------------------------------------------ layouts

LAYOUTS = {  # name: (data.format, prefix_sharing, packing)
    "pairs": ("pairs", False, False),
    "packed_pairs": ("pairs", False, True),
    "ranked": ("ranked", False, False),
    "packed_ranked": ("ranked", False, True),
    "unpaired": ("unpaired", False, False),
    "prefix_pairs": ("pairs", True, False),
    "packed_prefix_pairs": ("pairs", True, True),
    "prefix_ranked": ("ranked", True, False),
    "prefix_unpaired": ("unpaired", True, False),
}


def make_pipeline(fmt, items, batch_size, train=True, **fields):
    cls = {"pairs": PreferencePipeline, "ranked": ranked.RankedPipeline,
           "unpaired": unpaired.UnpairedPipeline}[fmt]
    cfg = helpers.data_config(format=fmt, max_length=ML, max_prompt_length=20, **fields)
    return cls(list(items), cfg, train=train, global_batch_size=batch_size, seed=0, pad_id=0)


def items_of(fmt):
    """Items of ``fmt`` of mixed lengths whose longest unit is reached by exactly one item;
    unpaired: two examples have different completions of the longest length and one of them
    has the longest prompt, so the bound is attained (a KL completion is never the example's
    own, so it takes the other one)."""
    if fmt == "pairs":
        return [pair(5, 7, 3), pair(9, 2, 11), pair(3, 4, 4), pair(6, 8, 1),
                pair(2, 5, 9), pair(7, 3, 6)]
    if fmt == "ranked":  # lists of 2, 3 and 4 responses (empty slots)
        return [ranked_item(5, [7, 3]), ranked_item(9, [2, 11, 4]),
                ranked_item(3, [4, 4, 2, 6]), ranked_item(6, [8, 1]), ranked_item(2, [5, 9, 3]),
                ranked_item(7, [3, 6, 1, 2])]
    # in this order (eval) the longest prompt meets the other longest completion
    return [unpaired_item(4, 8, start=4), unpaired_item(9, 8), unpaired_item(3, 5, False),
            unpaired_item(6, 2, False), unpaired_item(2, 7), unpaired_item(5, 1, False)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bound_and_every_unit_at_bucket_multiple_one(layout):
    """One auto bucket, rounding 1: the bucket (and the packed row) is exactly the longest unit
    any batch can hold, and every batch of three epochs places exactly the units computed here
    (each run of a segment id is one unit, of its independent length)."""
    fmt, prefix, packing = LAYOUTS[layout]
    items = items_of(fmt)
    pipe = make_pipeline(fmt, items, 2, bucket_multiple=1, num_buckets=1, packing=packing,
                         prefix_sharing=prefix)
    bound = worst_unit(fmt, prefix, items)
    assert pipe.buckets == [bound] and pipe.pack_length == bound, (pipe.buckets, bound)
    seen = 0
    for epoch in range(3):
        for position in range(pipe.num_batches):
            idx, _ = pipe.batch_items(epoch, position)
            batch = pipe.batch_at(epoch, position)
            assert batch["input_ids"].shape[1] == bound
            assert segment_lengths(batch) == [n for n in units(fmt, prefix, items, idx) if n]
            seen = max(seen, max(units(fmt, prefix, items, idx)))
    if fmt != "unpaired":  # every unit meets the bound in some batch; unpaired: some pairings
        assert seen == bound


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("delta", [-1, 0, 1])
def test_longest_unit_one_under_at_and_one_over_a_given_bucket(layout, delta):
    """Buckets given as the longest unit's length T minus delta: one under or at T the batch
    uses bucket T (the longest unit fills its row exactly at delta 0), one over a bucket
    T + 1 is added (rounding 1); packed with pack_length T: one over is refused."""
    fmt, prefix, packing = LAYOUTS[layout]
    items = items_of(fmt)
    T = worst_unit(fmt, prefix, items) - delta
    fields = dict(bucket_multiple=1, buckets=str(T), prefix_sharing=prefix, packing=packing)
    if packing:
        fields["pack_length"] = T
        if delta > 0:
            with pytest.raises(ValueError, match="pack_length"):
                make_pipeline(fmt, items, len(items), **fields)
            return
    pipe = make_pipeline(fmt, items, len(items), train=False, **fields)
    assert pipe.buckets == ([T] if delta <= 0 else [T, T + 1])
    batch = next(iter(pipe))
    L = batch["input_ids"].shape[1]
    assert L == max(pipe.buckets) and segment_lengths(batch) == [
        n for n in units(fmt, prefix, items, np.arange(len(items))) if n]
    assert max(segment_lengths(batch)) == T + delta  # this batch holds the longest unit
    if delta == 0 and not packing:
        full = (batch["segment_ids"] > 0).sum(axis=1) == L
        assert full.any()  # the longest unit ends in the row's last column


@pytest.mark.parametrize("prefix", [False, True])
@pytest.mark.parametrize("over", [-1, 0, 1, 2])
def test_unpaired_kl_completion_cut_at_max_length(prefix, over):
    """The mismatched KL sequence (a prompt with the other example's completion) of length
    max_length + over before the cut: one under, at, one and two over max_length. Unshared it
    is cut to exactly max_length; the bound is min(longest prompt + completion, max_length)
    and every placed unit has its independently cut length."""
    long_c = ML - 10 + over
    items = [unpaired_item(10, 4), unpaired_item(3, long_c, False), unpaired_item(4, 6)]
    pipe = make_pipeline("unpaired", items, 3, bucket_multiple=1, num_buckets=1,
                         prefix_sharing=prefix)
    bound = worst_unit("unpaired", prefix, items)
    if prefix:  # a loose bound (prompt + 1 + 2 * completion, max_length not applied) ...
        assert pipe.buckets[-1] == 10 + 1 + 2 * long_c >= bound
    else:
        assert pipe.buckets[-1] == min(10 + long_c, ML) == bound
    met = 0  # batches where the long completion precedes the long prompt (shuffled epochs)
    for epoch in range(8):
        idx, _ = pipe.batch_items(epoch, 0)
        batch = pipe.batch_at(epoch, 0)  # ... that every batch fits
        assert segment_lengths(batch) == units("unpaired", prefix, items, idx)
        if list(idx).index(1) == (list(idx).index(0) - 1) % 3:
            met += 1
            if not prefix:  # the KL sequence cut to exactly max_length (when over)
                assert max(segment_lengths(batch)) == min(10 + long_c, ML)
    assert met > 0


@pytest.mark.parametrize("prefix", [False, True])
def test_unpaired_bound_covers_examples_of_different_batches(prefix):
    """Auto buckets come from epoch 0's batches; an unpaired bound must also cover a prompt and
    a completion that first meet in a later epoch: here the longest prompt and the longest
    completion sit in different batches of the (eval-ordered) epoch 0, whose batch bounds stay
    exactly one under the global one."""
    items = [unpaired_item(10, 2), unpaired_item(2, 3), unpaired_item(2, 11), unpaired_item(9, 2)]
    pipe = make_pipeline("unpaired", items, 2, train=False, bucket_multiple=1,
                         prefix_sharing=prefix)
    want = 10 + 1 + 2 * 11 if prefix else 10 + 11  # both maxima in one example's unit
    batch_bounds = [9 + 1 + 2 * 11, 10 + 1 + 2 * 3] if prefix else [9 + 11, 10 + 3]
    assert max(batch_bounds) == want - 1
    assert pipe.buckets[-1] == want
    if not prefix:
        assert want == worst_unit("unpaired", False, items)


@pytest.mark.parametrize("layout", ["unpaired", "packed_unpaired", "prefix_unpaired",
                                    "packed_prefix_unpaired"])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_unpaired_partner_not_the_previous_example(layout, batch_size):
    """KL partners that are not the batch's previous example: a batch of one (the partner
    comes from the split) and a batch of two that share a completion. Eval order, B = 1:
    (0: prompt 3, A of 2), (1: 3, B of 20), (2: 10, C of 5), (3: 4, C): the partners are
    3, 0, 1, 1 (item 3 skips item 2's equal C), so the per-batch longest sequences are 8, 23,
    30, 24 where the examples' own completions give 5, 23, 15, 9. B = 2: batches [0, 1] and
    [2, 3]; in the second both have C, so the partners are 1 and 1 (from the split): longest
    23 and 30 (own completions: 23 and 15). The auto buckets follow the longest sequences the
    partners actually used (or the prefix-shared bound, prompt + 1 + completion + longest
    partner completion), and every batch places exactly the units computed here."""
    fmt, prefix = "unpaired", layout.endswith("prefix_unpaired")
    packing = layout.startswith("packed")
    items = [unpaired_item(3, 2), unpaired_item(3, 20, False), unpaired_item(10, 5, start=7),
             unpaired_item(4, 5, False, start=7)]
    want_partners = {1: [[3], [0], [1], [1]], 2: [[1, 0], [1, 1]]}[batch_size]
    want_longest = {1: [8, 23, 30, 24], 2: [23, 30]}[batch_size]  # unshared sequences
    pipe = make_pipeline(fmt, items, batch_size, train=False, bucket_multiple=1,
                         num_buckets=4, packing=packing, prefix_sharing=prefix)
    batches = pipe.epoch_batches(0)
    maxima = []
    for position, idx in enumerate(batches):
        partners = [kl_partner(items, idx, j) for j in range(len(idx))]
        assert partners == want_partners[position]
        if prefix:  # the loose bound of data/unpaired.py: longest prompt + 1 + the two longest
            lp = max(len(items[i]["prompt"]) for i in idx)
            own = max(len(items[i]["completion"]) for i in idx)
            kl = max(own, max(len(items[c]["completion"]) for c in partners))
            maxima.append(lp + 1 + own + kl)
        else:
            maxima.append(max(units(fmt, False, items, idx)))
        batch = pipe.batch_at(0, position)
        assert segment_lengths(batch) == units(fmt, prefix, items, idx)
    if not prefix:
        assert maxima == want_longest
    bound = 10 + 1 + 20 + 20 if prefix else 10 + 20  # any prompt with any completion
    want = batching.choose_buckets(np.asarray(maxima), 4, 1)
    assert pipe.buckets == (want if want[-1] >= bound else want + [bound])


@pytest.mark.parametrize("layout", ["pairs", "packed_pairs", "prefix_pairs",
                                    "packed_prefix_pairs"])
def test_auto_buckets_cover_a_pair_dropped_from_epoch_0(layout):
    """Train order drops the last partial batch: 3 pairs in batches of 2, the longest
    (prompt 20 + chosen 10 = 30 tokens; prefix-shared 20 - 1 + 11 + 6 = 36 columns) left out
    of epoch 0 by some seeds. Auto buckets come from epoch 0's batches; the longest unit still
    gets a bucket (before: a later epoch's batch was refused as longer than the largest bucket,
    and packing refused pack_length at construction)."""
    fmt, prefix, packing = LAYOUTS[layout]
    items = [pair(3, 2, 2), pair(3, 3, 2), pair(20, 10, 5)]
    longest = 20 - 1 + 11 + 6 if prefix else 20 + 10
    dropped = 0
    for seed in range(8):
        cfg = helpers.data_config(format=fmt, max_length=ML, max_prompt_length=20,
                                  bucket_multiple=1, num_buckets=1, packing=packing,
                                  prefix_sharing=prefix)
        pipe = PreferencePipeline(items, cfg, train=True, global_batch_size=2, seed=seed,
                                  pad_id=0)
        first = max(units(fmt, prefix, items, pipe.epoch_batches(0)[0]))
        if 2 not in pipe.epoch_batches(0)[0]:
            dropped += 1
            assert first < longest and pipe.buckets == [first, longest]
        else:
            assert pipe.buckets == [longest] == [first]
        for epoch in range(4):
            idx, _ = pipe.batch_items(epoch, 0)
            assert segment_lengths(pipe.batch_at(epoch, 0)) == units(fmt, prefix, items, idx)
    assert dropped > 0
