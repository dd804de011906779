"""``data.shuffle=False``: train batches in the file's order every epoch, resumed exactly; a
resume into a stream with the other setting is refused."""

import numpy as np
import pytest

from dpo_jax.data import DataError, build_pipeline, default_data_config
from dpo_jax.data.config import validate
from tests import helpers

B = 8


def _cfg(**kw):
    c = default_data_config()
    c.synthetic.num_train = 60  # 7 full batches of 8, the last 4 pairs dropped each epoch
    c.synthetic.num_eval = 16
    c.buckets = "48"
    c.update(kw)
    return c


def _pipe(cfg):
    return build_pipeline(cfg, split="train", global_batch_size=B, seed=3)


def _chosen_rows(pipe, batch):
    """The pair index of each chosen row (rows 0..B-1), found by its tokens."""
    out = []
    for row in batch["input_ids"][:B]:
        hits = [i for i, p in enumerate(pipe.pairs)
                if np.array_equal(row[:len(p["prompt"]) + len(p["chosen"])],
                                  np.concatenate([p["prompt"], p["chosen"]]))]
        out.append(hits[0])
    return out


def test_no_shuffle_serves_the_file_order_every_epoch():
    pipe = _pipe(_cfg(shuffle=False))
    per_epoch = pipe.num_batches
    assert per_epoch == 60 // B
    seen = [_chosen_rows(pipe, next(pipe)) for _ in range(2 * per_epoch)]
    want = np.arange(per_epoch * B).reshape(per_epoch, B).tolist()
    assert seen == want + want
    shuffled = _pipe(_cfg())
    assert [_chosen_rows(shuffled, next(shuffled)) for _ in range(per_epoch)] != want


def test_no_shuffle_resumes_exactly_and_refuses_the_other_order():
    cfg = _cfg(shuffle=False)
    full = _pipe(cfg)
    batches = [next(full) for _ in range(10)]
    state = helpers.assert_resumes(lambda: _pipe(cfg), batches, after=4, through_json=False)
    assert state["shuffle"] is False
    with pytest.raises(DataError, match="shuffle"):
        _pipe(_cfg()).load_state_dict(state)
    old = {k: v for k, v in _pipe(_cfg()).state_dict().items() if k != "shuffle"}
    _pipe(_cfg()).load_state_dict(old)  # a state written before the field: a shuffled stream
    with pytest.raises(DataError, match="shuffle"):
        _pipe(cfg).load_state_dict(old)


def test_no_shuffle_with_length_grouping_is_refused():
    with pytest.raises(ValueError, match="group_by_length"):
        validate(_cfg(shuffle=False, group_by_length=2))
