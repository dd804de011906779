"""KTO's mismatched (KL) completions (data.format='unpaired'): never an example's own
completion, whatever the batch size, padding, repeats or process count."""

import numpy as np
import pytest

from dpo_jax.data import unpaired
from dpo_jax.data.errors import DataError
from tests import helpers


def _items(pairs):
    return [unpaired.checked_unpaired(it, end_ids={0}, is_blank=None, file="s", row=i)
            for i, it in enumerate(unpaired.unpair_tokens(pairs))]


def _pipe(items, batch_size, *, train, process_index=0, process_count=1, **fields):
    cfg = helpers.data_config(format="unpaired", buckets="64", **fields)
    return unpaired.UnpairedPipeline(items, cfg, train=train, global_batch_size=batch_size,
                                     pad_id=0, seed=3, process_index=process_index,
                                     process_count=process_count)


def _want_partner(items, idx, j, max_length=512):
    """The rule, written out: the nearest previous example of the batch (cyclically) whose
    completion, cut to the KL slot's ``max(max_length - prompt, 1)`` tokens, differs from
    example j's, else the nearest previous such item of the split. Eval padding (-1) is item 0,
    as served (``batch_items``)."""
    idx = [int(i) if i >= 0 else 0 for i in idx]
    own = items[idx[j]]["completion"]
    keep = max(max_length - len(items[idx[j]]["prompt"]), 1)
    B, N = len(idx), len(items)
    for c in [idx[(j - k) % B] for k in range(1, B)] + [(idx[j] - k) % N for k in range(1, N)]:
        if not np.array_equal(items[c]["completion"][:keep], own):
            return c
    raise AssertionError("no other completion")


def _check_batch(items, pipe, epoch, position, batch):
    idx, _ = pipe.batch_items(epoch, position)
    B, max_length = len(idx), int(pipe.cfg.max_length)
    for j in range(B):
        own = items[idx[j]]["completion"]
        keep = max(max_length - len(items[idx[j]]["prompt"]), 1)
        got_own = batch["input_ids"][j][batch["loss_mask"][j] > 0]
        got_kl = batch["input_ids"][B + j][batch["loss_mask"][B + j] > 0]
        np.testing.assert_array_equal(got_own, own)
        partner = _want_partner(items, idx, j, max_length)
        np.testing.assert_array_equal(got_kl, items[partner]["completion"][:keep])
        assert not np.array_equal(got_kl, own)
    return idx


def test_batch_of_one_takes_the_previous_different_completion_of_the_split():
    items = _items(helpers.synthetic_pairs(6, seed=2))
    pipe = _pipe(items, 1, train=True)
    seen = set()
    for position in range(12):
        batch = pipe.batch_at(0, position)
        seen.add(int(_check_batch(items, pipe, 0, position, batch)[0]))
    assert len(seen) == 12


def test_batches_of_one_repeated_completion_fall_back_to_the_split():
    """Four prompts share completion A (a batch of them has no mismatched completion inside),
    four others share B; data in file order."""
    pairs = helpers.synthetic_pairs(8, seed=4)
    a, b = pairs[0]["chosen"], pairs[1]["rejected"]
    items = [{"prompt": p["prompt"], "completion": a if i < 4 else b, "desirable": i % 2 == 0}
             for i, p in enumerate(pairs)]
    items = [unpaired.checked_unpaired(it, end_ids={0}, is_blank=None, file="s", row=i)
             for i, it in enumerate(items)]
    pipe = _pipe(items, 4, train=True, shuffle=False)
    for position in range(2):
        _check_batch(items, pipe, 0, position, pipe.batch_at(0, position))
    # Shuffled batches mixing A and B take their partner inside the batch.
    pipe = _pipe(items, 4, train=True)
    for position in range(2):
        idx = _check_batch(items, pipe, 1, position, pipe.batch_at(1, position))
        assert len({items[i]["completion"].tobytes() for i in idx}) in (1, 2)


@pytest.mark.parametrize("n,batch_size", [(5, 4), (9, 4), (2, 3)])
def test_padded_eval_batches(n, batch_size):
    """The last eval batch is padded with copies of item 0 at weight 0: a real example's KL
    completion is still another completion (eval of one pair: two examples)."""
    items = _items(helpers.synthetic_pairs(n, seed=5))[:n]
    pipe = _pipe(items, batch_size, train=False)
    batches = list(pipe)
    for position, batch in enumerate(batches):
        _check_batch(items, pipe, 0, position, batch)
    assert batches[-1]["pair_weight"].min() == 0.0 or n % batch_size == 0


@pytest.mark.parametrize("process_count", [2, 4])
def test_the_cycle_is_over_the_global_batch(process_count):
    items = _items(helpers.synthetic_pairs(8, seed=6))
    one = _pipe(items, 8, train=True)
    hosts = [_pipe(items, 8, train=True, process_index=p, process_count=process_count)
             for p in range(process_count)]
    for position in range(2):
        want = one.batch_at(0, position)
        _check_batch(items, one, 0, position, want)
        got = [h.batch_at(0, position) for h in hosts]
        for k in want:
            np.testing.assert_array_equal(np.concatenate([g[k] for g in got]), want[k])


def test_prefix_shared_units_hold_the_same_kl_completion():
    items = _items(helpers.synthetic_pairs(3, seed=7))
    flat = _pipe(items, 1, train=True)
    shared = _pipe(items, 1, train=True, prefix_sharing=True)
    for position in range(4):
        idx, _ = flat.batch_items(0, position)
        np.testing.assert_array_equal(shared.kl_partners(idx), flat.kl_partners(idx))
        batch = shared.batch_at(0, position)
        kl = batch["input_ids"][batch["seq_index"] == 1]  # slot 1 of the one example
        np.testing.assert_array_equal(
            kl, items[_want_partner(items, idx, 0)]["completion"])


def test_a_split_with_one_completion_is_refused():
    pairs = helpers.synthetic_pairs(4, seed=8)
    items = [unpaired.checked_unpaired({"prompt": p["prompt"], "completion": pairs[0]["chosen"],
                                        "desirable": True}, end_ids={0}, is_blank=None,
                                       file="s", row=i) for i, p in enumerate(pairs)]
    with pytest.raises(DataError, match="same completion") as e:
        _pipe(items, 2, train=True)
    assert e.value.reason == "kl_completion" and e.value.field == "completion"


def _hand(prompt_len, completion, desirable=True):
    return {"prompt": np.arange(1, prompt_len + 1, dtype=np.int32),
            "completion": np.asarray(completion, np.int32), "desirable": desirable}


@pytest.mark.parametrize("batch_size", [3, 1])
@pytest.mark.parametrize("prefix", [False, True])
def test_a_completion_equal_to_its_own_once_cut_is_skipped(batch_size, prefix):
    """max_length 16: example 1 (prompt 10) keeps 6 KL tokens, and example 0's completion
    E = D + (11, 12) cut to 6 is example 1's own D; so example 1 skips example 0 (its previous
    example in the batch of 3, its previous item of the split in batches of 1) and takes F.
    Partners by hand: 0 -> 2 (F), 1 -> 2 (F), 2 -> 1 (D)."""
    d = [5, 6, 7, 8, 9, 10]
    items = [_hand(4, d + [11, 12]), _hand(10, d, False), _hand(4, [20, 21, 22])]
    pipe = _pipe(items, batch_size, train=False, max_length=16, max_prompt_length=8,
                 prefix_sharing=prefix)
    kl = {0: [20, 21, 22], 1: [20, 21, 22], 2: d}
    for position, batch in enumerate(pipe):
        idx, _ = pipe.batch_items(0, position)
        assert list(pipe.kl_partners(idx)) == [{0: 2, 1: 2, 2: 1}[int(i)] for i in idx]
        for j, i in enumerate(idx):
            got = batch["input_ids"][batch["seq_index"] == batch_size + j] if prefix else \
                batch["input_ids"][batch_size + j][batch["loss_mask"][batch_size + j] > 0]
            np.testing.assert_array_equal(got, kl[int(i)])
        if not prefix:
            _check_batch(items, pipe, 0, position, batch)


def test_eval_padding_reads_item_0_in_kl_partners():
    """The last eval batch of 5 examples in batches of 4 is [4, -1, -1, -1]; its padding slots
    are served as item 0, and ``kl_partners`` of the raw row (as ``epoch_batches`` gives it)
    reads them so too: example 4 takes the padding slot's completion (item 0), the padding
    slots take example 4's (by hand: 0, 4, 4, 4; padding read as the last item would give
    example 4 no other completion in the batch and item 3 from the split)."""
    items = [_hand(3, [10 + i] * (i + 1)) for i in range(5)]
    pipe = _pipe(items, 4, train=False)
    raw = pipe.epoch_batches(0)[-1]
    assert list(raw) == [4, -1, -1, -1]
    served, weight = pipe.batch_items(0, 1)
    assert list(served) == [4, 0, 0, 0] and list(weight) == [1, 0, 0, 0]
    assert list(pipe.kl_partners(raw)) == [0, 4, 4, 4]
    assert list(pipe.kl_partners(served)) == [0, 4, 4, 4]
    _check_batch(items, pipe, 0, 1, pipe.batch_at(0, 1))
