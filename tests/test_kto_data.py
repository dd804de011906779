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


def _want_partner(items, idx, j):
    """The rule, written out: the nearest previous example of the batch (cyclically) whose
    completion differs from example j's, else the nearest previous item of the split."""
    own = items[idx[j]]["completion"]
    B, N = len(idx), len(items)
    for k in range(1, B):
        c = idx[(j - k) % B]
        if not np.array_equal(items[c]["completion"], own):
            return c
    for k in range(1, N):
        c = (idx[j] - k) % N
        if not np.array_equal(items[c]["completion"], own):
            return c
    raise AssertionError("no other completion")


def _check_batch(items, pipe, epoch, position, batch):
    idx, _ = pipe.batch_items(epoch, position)
    B = len(idx)
    for j in range(B):
        own = items[idx[j]]["completion"]
        got_own = batch["input_ids"][j][batch["loss_mask"][j] > 0]
        got_kl = batch["input_ids"][B + j][batch["loss_mask"][B + j] > 0]
        np.testing.assert_array_equal(got_own, own)
        np.testing.assert_array_equal(got_kl, items[_want_partner(items, idx, j)]["completion"])
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
