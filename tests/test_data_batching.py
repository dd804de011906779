"""Batch format, buckets, packing, resume, eval coverage and multi-host slicing."""


import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dpo_jax.data import DataError, build_pipeline, to_global
from dpo_jax.data import batching
from dpo_jax.data.config import read_data
from dpo_jax.data.pipeline import PreferencePipeline
from tests import helpers


def _cfg(**kw):
    c = helpers.data_config(**kw)
    c.synthetic.num_train = 96
    c.synthetic.num_eval = 37
    return c


def _sequences(batch, B):
    """{slot: (tokens, loss_mask, positions)} recovered from a batch (packed or not)."""
    out = {}
    ids, pos, seg, mask = (batch[k] for k in ("input_ids", "positions", "segment_ids",
                                                "loss_mask"))
    for r in range(ids.shape[0]):
        for s in np.unique(seg[r][seg[r] > 0]):
            sel = seg[r] == s
            if "seq_index" in batch:
                slots = np.unique(batch["seq_index"][r][sel & (mask[r] > 0)])
                assert len(slots) == 1
                slot = int(slots[0])
            else:
                slot = r
            out[slot] = (ids[r][sel].tolist(), mask[r][sel].tolist(), pos[r][sel].tolist())
    return out


def test_format_and_masks():
    p = build_pipeline(_cfg(), split="train", global_batch_size=8)
    b = next(p)
    assert set(b) == {"input_ids", "positions", "segment_ids", "loss_mask", "pair_weight"}
    R, L = b["input_ids"].shape
    assert R == 16 and L in p.buckets
    assert b["input_ids"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
    assert b["pair_weight"].shape == (8,) and (b["pair_weight"] == 1).all()
    idx = p.epoch_batches(0)[0]
    for r in range(R):
        pair = p.pairs[idx[r % 8]]
        resp = pair["chosen"] if r < 8 else pair["rejected"]
        n_p, n = len(pair["prompt"]), len(pair["prompt"]) + len(resp)
        np.testing.assert_array_equal(b["input_ids"][r, :n], np.concatenate([pair["prompt"], resp]))
        # mask covers exactly the response (EOS included), never prompt or padding
        assert b["loss_mask"][r, :n_p].sum() == 0 and b["loss_mask"][r, n:].sum() == 0
        assert (b["loss_mask"][r, n_p:n] == 1).all()
        assert (b["segment_ids"][r, :n] == 1).all() and (b["segment_ids"][r, n:] == 0).all()
        np.testing.assert_array_equal(b["positions"][r, :n], np.arange(n))
        assert resp[-1] == 0  # synthetic EOS


def test_eval_covers_every_pair_once_and_pads_with_zero_weight():
    p = build_pipeline(_cfg(), split="eval", global_batch_size=8)
    batches = list(p)
    assert len(batches) == 5 == p.num_batches
    w = np.concatenate([b["pair_weight"] for b in batches])
    assert w.sum() == 37 and (w[37:] == 0).all()
    seen = [tuple(p.pairs[i]["prompt"]) for i in p.epoch_batches(0).ravel() if i >= 0]
    assert len(seen) == 37 and sorted(p.epoch_batches(0).ravel()[:37]) == list(range(37))
    assert len(list(p)) == 5  # iterating again starts over
    assert p.stats["padding_fraction_per_epoch"]


def test_train_and_eval_differ():
    tr = build_pipeline(_cfg(), split="train", global_batch_size=8)
    ev = build_pipeline(_cfg(), split="eval", global_batch_size=8)
    tr_prompts = {tuple(p["prompt"]) + tuple(p["chosen"]) for p in tr.pairs}
    assert not any(tuple(p["prompt"]) + tuple(p["chosen"]) in tr_prompts for p in ev.pairs)


def test_resume_gives_identical_batches():
    cfg = _cfg()
    full = build_pipeline(cfg, split="train", global_batch_size=8, seed=3)
    ref = [next(full) for _ in range(30)]  # crosses epochs (12 batches per epoch)
    state = helpers.assert_resumes(
        lambda: build_pipeline(cfg, split="train", global_batch_size=8, seed=3), ref, after=17)
    other = build_pipeline(cfg, split="train", global_batch_size=8, seed=4)
    assert not np.array_equal(next(other)["input_ids"], ref[0]["input_ids"])
    with pytest.raises(DataError, match="cannot resume.*seed"):
        other.load_state_dict(state)


def test_epochs_reshuffle_and_drop_remainder():
    p = build_pipeline(_cfg(), split="train", global_batch_size=10)
    assert p.num_batches == 9
    e0, e1 = p.epoch_batches(0), p.epoch_batches(1)
    assert len(set(e0.ravel())) == 90 and not np.array_equal(e0, e1)


def test_auto_buckets_from_batch_maxima():
    maxima = np.array([10] * 50 + [30] * 30 + [60] * 15 + [200] * 5)
    b = batching.choose_buckets(maxima, 4, 16)
    assert b[-1] == 208 and len(b) <= 5 and b == sorted(b)
    assert batching.pick_bucket(b, 11) == b[0] and batching.pick_bucket(b, 200) == 208
    p = build_pipeline(_cfg(buckets="16,24,48"), split="train", global_batch_size=8)
    assert p.buckets == [16, 24, 48]
    assert all(next(p)["input_ids"].shape[1] in (16, 24, 48) for _ in range(12))
    assert len(p.stats["shapes_seen"]) <= 3


def test_group_by_length_reduces_padding():
    a = build_pipeline(_cfg(buckets="16,20,24,28,32"), split="train", global_batch_size=8)
    g = build_pipeline(_cfg(buckets="16,20,24,28,32", group_by_length=4), split="train",
                       global_batch_size=8)
    for p in (a, g):
        for _ in range(p.num_batches):
            next(p)
    assert g.stats["padding_fraction_per_epoch"][0] < a.stats["padding_fraction_per_epoch"][0]


def test_packing_equivalence():
    un = build_pipeline(_cfg(buckets="64"), split="train", global_batch_size=16)
    pk = build_pipeline(_cfg(buckets="64", packing=True), split="train",
                        global_batch_size=16)
    bu, bp = next(un), next(pk)
    assert bp["input_ids"].size < bu["input_ids"].size  # it saves compute here
    assert set(bp) == set(bu) | {"seq_index"}
    su, sp = _sequences(bu, 16), _sequences(bp, 16)
    assert sorted(su) == sorted(sp) == list(range(32))
    for s in su:
        assert su[s] == sp[s]
    # positions restart per segment; segment ids 0 only on padding
    assert (bp["positions"][bp["segment_ids"] == 0] == 0).all()
    assert (bp["seq_index"][bp["loss_mask"] == 0] == -1).all()
    np.testing.assert_array_equal(bp["pair_weight"], bu["pair_weight"])


def test_packing_falls_back_when_it_does_not_save():
    pk = build_pipeline(_cfg(buckets="32", packing=True), split="train", global_batch_size=8)
    b = next(pk)
    assert b["input_ids"].shape[0] <= 16 and "seq_index" in b
    assert sorted(_sequences(b, 8)) == list(range(16))
    plan = batching.make_plan(np.full(16, 20), [32], True, 32, 1)
    assert (plan.rows, plan.length, plan.packed) == (16, 32, True)
    plan = batching.make_plan(np.full(16, 20), [32], True, 64, 1)
    assert (plan.rows, plan.length) == (6, 64)  # three 20-token sequences per row


def test_pack_length_step_tries_longer_rows_worked_by_hand():
    """Sequences 300, 200, 180, 150 with pack_length 320 (bucket 320): rows of 320 hold one
    each (4 x 320 = 1280, a tie, so one per row wins). Step 64 also tries 384 (FFD: 300 | 200
    + 180 | 150 = 3 x 384 = 1152), 448 (300 | 200 + 180 | 150: 1344), 512 (300 + 200 | 180 +
    150: 2 x 512 = 1024) and 576 (1152): the 512-token rows win."""
    lengths = np.array([300, 200, 180, 150])
    assert batching.pack_lengths(320, 64) == [320, 384, 448, 512, 576]
    assert batching.pack_lengths(320, 0) == [320]
    plan = batching.make_plan(lengths, [320], True, 320, 1)
    assert (plan.rows, plan.length) == (4, 320) and plan.row.tolist() == [0, 1, 2, 3]
    plan = batching.make_plan(lengths, [320], True, 320, 1, pack_length_step=64)
    assert (plan.rows, plan.length) == (2, 512)
    assert plan.row.tolist() == [0, 0, 1, 1] and plan.offset.tolist() == [0, 300, 0, 180]
    # equal columns at two lengths, the shorter rows win: 113, 90, 76, 49 fill 3 rows of 128
    # (113 | 90 | 76 + 49) or 2 rows of 192 (113 + 76 | 90 + 49), 384 columns each
    plan = batching.make_plan(np.array([113, 90, 76, 49]), [128], True, 128, 1,
                              pack_length_step=64)
    assert (plan.rows, plan.length) == (3, 128) and plan.row.tolist() == [0, 1, 2, 2]
    # the row multiple still holds: 3 rows of 384 round up to 4, so 512's 2 rows win
    plan = batching.make_plan(lengths, [320], True, 320, 2, pack_length_step=64)
    assert (plan.rows, plan.length) == (2, 512)
    with pytest.raises(ValueError, match="pack_length_step"):
        batching.pack_lengths(320, -1)
    with pytest.raises(ValueError, match="data.pack_length_step"):
        read_data(helpers.data_config(packing=True, pack_length_step=-16))


def test_pack_length_step_pipeline_serves_the_same_sequences_in_fewer_columns():
    """A pipeline with ``pack_length_step`` serves every sequence with the same tokens, mask and
    positions as one sequence per row, never in more columns than ``pack_length`` rows alone
    (over a whole epoch), and reports the step in its stats."""
    kw = dict(buckets="48", packing=True, pack_length=48)
    un = build_pipeline(_cfg(buckets="48"), split="train", global_batch_size=8)
    fixed = build_pipeline(_cfg(**kw), split="train", global_batch_size=8)
    stepped = build_pipeline(_cfg(pack_length_step=16, **kw), split="train", global_batch_size=8)
    cols = {"fixed": 0, "stepped": 0}
    lengths = set()
    for _ in range(stepped.num_batches):
        bu, bf, bs = next(un), next(fixed), next(stepped)
        su, ss = _sequences(bu, 8), _sequences(bs, 8)
        assert sorted(su) == sorted(ss) == list(range(16))
        for s in su:
            assert su[s] == ss[s]
        cols["fixed"] += bf["input_ids"].size
        cols["stepped"] += bs["input_ids"].size
        lengths.add(bs["input_ids"].shape[1])
    assert cols["stepped"] < cols["fixed"], cols
    assert lengths - {48}, "no batch used a longer row"
    assert max(lengths) < 96
    assert stepped.stats["pack_length_step"] == 16 and fixed.stats["pack_length_step"] == 0


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("split", ["train", "eval"])
def test_multihost_slices_partition_the_global_batch(packing, split):
    kw = dict(packing=packing, pack_length=96, buckets="32")
    glob = build_pipeline(_cfg(**kw), split=split, global_batch_size=16)
    hosts = [build_pipeline(_cfg(**kw), split=split, global_batch_size=16, process_index=i,
                            process_count=4) for i in range(4)]
    for _ in range(3):
        g = next(glob)
        parts = [next(h) for h in hosts]
        for k in g:
            assert all(part[k].shape[0] * 4 == g[k].shape[0] for part in parts)
            np.testing.assert_array_equal(np.concatenate([part[k] for part in parts]), g[k])
        # no overlap: every scored sequence slot lives on exactly one host
        if packing:
            slots = [set(np.unique(part["seq_index"])) - {-1} for part in parts]
            assert sum(map(len, slots)) == len(set().union(*slots)) == 32


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 2, 2), (1, 8, 1)])
def test_to_global_with_fake_devices(shape):
    p = build_pipeline(_cfg(), split="train", global_batch_size=8)
    b = next(p)
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(shape), ("data", "fsdp", "tensor"))
    g = to_global(b, NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None)))
    for k in b:
        assert g[k].shape == b[k].shape
        np.testing.assert_array_equal(np.asarray(g[k]), b[k])
    assert g["pair_weight"].sharding.spec == PartitionSpec(("data", "fsdp"))


def test_bad_multihost_args():
    with pytest.raises(ValueError):
        build_pipeline(_cfg(), split="train", global_batch_size=6, process_count=4)
    with pytest.raises(ValueError):
        PreferencePipeline([], _cfg(), train=False, global_batch_size=4, process_index=4,
                           process_count=4)
