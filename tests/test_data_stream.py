"""The batch-stream skeleton (``dpo_jax.data.stream.BatchStream``) and its three streams:
order per epoch, eval padding, process slices and resumable state with one set of checks."""

import json

import numpy as np
import pytest

from dpo_jax.data import (BatchStream, DataError, PreferencePipeline, PromptStream, TextPipeline,
                          default_data_config)
from dpo_jax.data.synthetic import SyntheticTask, make_pairs


class IndexStream(BatchStream):
    """The skeleton alone: a batch is this process's item indices and weights."""

    def batch_at(self, epoch, position):
        idx, weight = self.batch_items(epoch, position)
        return {"idx": self.host_block(idx), "weight": self.host_block(weight)}


def _pairs(n=30):
    return make_pairs(SyntheticTask(), n, 0)


def _streams(train, process_index=0, process_count=1, seed=3, batch=8):
    """One stream of each kind over the same 30 items."""
    pairs, cfg = _pairs(), default_data_config()
    kw = dict(train=train, global_batch_size=batch, process_index=process_index,
              process_count=process_count, seed=seed)
    return {
        "index": IndexStream(len(pairs), **kw),
        "pairs": PreferencePipeline(pairs, cfg, **kw),
        "text": TextPipeline([{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs],
                             cfg, **kw),
        "prompts": PromptStream([p["prompt"] for p in pairs], width=16, **kw),
    }


def _equal(a, b):
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_train_order_reshuffles_each_epoch_and_drops_the_last_partial_batch():
    s = IndexStream(30, train=True, global_batch_size=8, seed=(1, 2))
    assert s.num_batches == 3
    epochs = [np.concatenate([next(s)["idx"] for _ in range(3)]) for _ in range(3)]
    for e, served in enumerate(epochs):
        assert len(set(served.tolist())) == 24  # 24 distinct of 30: 6 dropped
        np.testing.assert_array_equal(served, s.epoch_batches(e).ravel())
        want = np.random.default_rng([1, 2, e]).permutation(30)[:24]
        np.testing.assert_array_equal(served, want)  # the order is a function of (seed, epoch)
    assert not np.array_equal(epochs[0], epochs[1])
    assert (s.epoch, s.position) == (3, 0)


def test_eval_is_one_pass_in_order_padded_with_weight_zero_copies_of_item_0():
    s = IndexStream(30, train=False, global_batch_size=8, seed=0)
    for _ in range(2):  # iterating again starts over
        batches = list(s)
        assert len(batches) == 4 == s.num_batches
        idx = np.concatenate([b["idx"] for b in batches])
        weight = np.concatenate([b["weight"] for b in batches])
        np.testing.assert_array_equal(idx[:30], np.arange(30))
        assert (idx[30:] == 0).all() and (weight[30:] == 0).all() and (weight[:30] == 1).all()


@pytest.mark.parametrize("train", [True, False])
def test_process_blocks_partition_the_global_batch_for_every_stream(train):
    whole = _streams(train)
    hosts = [_streams(train, process_index=p, process_count=2) for p in range(2)]
    for kind, stream in whole.items():
        for _ in range(5 if train else 4):
            want = next(stream)
            parts = [next(h[kind]) for h in hosts]
            for k in want:
                got = np.concatenate([part[k] for part in parts])
                np.testing.assert_array_equal(got, want[k], err_msg=f"{kind}/{k}")


@pytest.mark.parametrize("kind", ["index", "pairs", "text", "prompts"])
@pytest.mark.parametrize("taken", [2, 3, 7])  # mid-epoch, at an epoch boundary, a later epoch
def test_resume_from_a_json_state_continues_the_same_stream(kind, taken):
    full = _streams(train=True)[kind]
    want = [next(full) for _ in range(taken + 4)]
    part = _streams(train=True)[kind]
    for _ in range(taken):
        next(part)
    state = json.loads(json.dumps(part.state_dict()))
    resumed = _streams(train=True)[kind]
    resumed.load_state_dict(state)
    for w in want[taken:]:
        _equal(next(resumed), w)


@pytest.mark.parametrize("kind", ["index", "pairs", "text", "prompts"])
def test_resume_refuses_another_item_count_batch_size_or_seed(kind):
    state = _streams(train=True)[kind].state_dict()
    assert set(state) == {"epoch", "position", "seed", "num_items", "global_batch_size",
                          "shuffle"}
    for changed, field in ((_streams(train=True, seed=4), "seed"),
                           (_streams(train=True, batch=6), "global_batch_size")):
        with pytest.raises(DataError, match=f"{field}="):
            changed[kind].load_state_dict(state)
    with pytest.raises(DataError, match="num_items="):
        _streams(train=True)[kind].load_state_dict(dict(state, num_items=31))
    with pytest.raises(DataError, match="lacks"):
        _streams(train=True)[kind].load_state_dict({"epoch": 0, "position": 1})
    # the process count is not part of the state: the global stream is the same on any count
    _streams(train=True, process_index=1, process_count=2)[kind].load_state_dict(state)


def test_constructor_errors():
    with pytest.raises(ValueError, match="multiple of the process count"):
        IndexStream(30, train=True, global_batch_size=6, seed=0, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        IndexStream(30, train=True, global_batch_size=8, seed=0, process_index=2,
                    process_count=2)
    with pytest.raises(DataError, match="5 train items < global batch size 8"):
        IndexStream(5, train=True, global_batch_size=8, seed=0)
    IndexStream(5, train=False, global_batch_size=8, seed=0)  # eval pads instead
    with pytest.raises(DataError, match="no prompts"):
        PromptStream([], train=False, global_batch_size=8, width=4, seed=0)
    with pytest.raises(ValueError, match="prompt width 2 < longest prompt 3"):
        PromptStream([np.arange(3)], train=False, global_batch_size=8, width=2, seed=0)
