"""The CHES data filter (``data.ches_filter``, ``dpo_jax/ches_filter.py``).

Which pairs a quantile flags is worked out by hand on written-out scores; the scores of the
scoring pass are ``test_diagnostics.numpy_ches`` (float64 from ``Model.hidden``); the cache is
hit on a second call and missed when the parameters change; a tiny DPO run trains on the
filtered pairs.
"""

from __future__ import annotations

import numpy as np
import pytest

from dpo_jax import ches_filter
from dpo_jax.config import read_config
from dpo_jax.data.config import ChesFilterConfig, read_ches_filter
from tests import helpers, runs
from tests.test_diagnostics import numpy_ches

SCORES = np.array([5.0, -1.0, 3.0, 10.0, 0.0])


def test_the_pairs_above_the_quantile_are_dropped_or_downweighted():
    """Scores 5, -1, 3, 10, 0: sorted -1 0 3 5 10, the 0.6 quantile is 3 + 0.4 (5 - 3) = 3.8,
    so pairs 0 (5) and 3 (10) are flagged; at quantile 0.5 the threshold is 3 itself, which
    pair 2 keeps."""
    pairs = [{"prompt": np.array([i]), "weight": 2.0 if i == 3 else 1.0} for i in range(5)]
    scores = {"ln_ches": SCORES, "ches": -SCORES}
    out, threshold = ches_filter.flagged(SCORES, 0.6)
    assert out.tolist() == [True, False, False, True, False] and threshold == pytest.approx(3.8)
    assert ches_filter.flagged(SCORES, 0.5)[0].tolist() == [True, False, False, True, False]

    kept, mask, stats = ches_filter.apply(pairs, scores, ChesFilterConfig("drop", "ln_ches", 0.6))
    assert [int(p["prompt"][0]) for p in kept] == [1, 2, 4] and mask.tolist() == [
        False, True, True, False, True]
    assert (stats["flagged"], stats["pairs_before"], stats["pairs_after"]) == (2, 5, 3)
    assert stats["score_mean_after"] == pytest.approx((-1 + 3 + 0) / 3)

    kept, _, _ = ches_filter.apply(pairs, scores, ChesFilterConfig("downweight", "ln_ches", 0.6,
                                                                  0.25))
    assert [p.get("weight", 1.0) for p in kept] == [0.25, 1.0, 1.0, 0.5, 1.0]
    # score='ches' reads the other array: -SCORES flags pairs 1 (1) and 4 (0) at 0.6
    kept, _, _ = ches_filter.apply(pairs, scores, ChesFilterConfig("drop", "ches", 0.6))
    assert [int(p["prompt"][0]) for p in kept] == [0, 2, 3]


def test_the_random_control_drops_the_same_count_without_reading_ches():
    """score='random': the flagged pairs are those whose seeded uniform draw is above the
    quantile (worked out from numpy's generator here), the count is the CHES filter's at the
    same quantile, the choice changes with the seed and not with the CHES scores, and the stats
    carry the kept pairs' mean ln-CHES."""
    n = 40
    pairs = [{"prompt": np.array([i])} for i in range(n)]
    ln = np.linspace(-3.0, 3.0, n)
    scores = {"ln_ches": ln, "ches": ln[::-1].copy()}
    cfg = ChesFilterConfig("drop", "random", 0.75, seed=7)
    kept, mask, stats = ches_filter.apply(pairs, scores, cfg)
    draws = np.random.default_rng(7).random(n)
    assert mask.tolist() == (draws <= np.quantile(draws, 0.75)).tolist()
    assert len(kept) == n - 10 == int(mask.sum())
    assert len(ches_filter.apply(pairs, scores, ChesFilterConfig("drop", "ln_ches", 0.75))[0]) \
        == len(kept)
    assert stats["ln_ches_mean_after"] == pytest.approx(ln[mask].mean())
    assert stats["seed"] == 7 and stats["ln_ches_mean"] == pytest.approx(0.0, abs=1e-12)
    shuffled = {"ln_ches": ln[::-1].copy(), "ches": ln.copy()}
    assert ches_filter.apply(pairs, shuffled, cfg)[1].tolist() == mask.tolist()
    other = ches_filter.apply(pairs, scores, ChesFilterConfig("drop", "random", 0.75, seed=8))
    assert other[1].tolist() != mask.tolist()
    assert read_ches_filter({"mode": "drop", "score": "random", "seed": 3}).seed == 3
    with pytest.raises(ValueError, match="3 ln_ches scores for 40 pairs"):
        ches_filter.apply(pairs, {"ln_ches": ln[:3], "ches": ln}, cfg)


@pytest.mark.parametrize("field,value,match", [
    ("mode", "keep", "data.ches_filter.mode"), ("score", "cos", "data.ches_filter.score"),
    ("quantile", 1.0, "data.ches_filter.quantile"), ("weight", 1.5, "data.ches_filter.weight"),
    ("fraction", 0.1, "data.ches_filter.fraction"),
])
def test_bad_settings_name_the_key(field, value, match):
    with pytest.raises(ValueError, match=match):
        read_ches_filter({"mode": "drop", field: value})


def test_the_filter_and_the_diagnostics_are_for_dpo_pairs():
    c = runs.reward_config()
    c.data.ches_filter.mode = "drop"
    with pytest.raises(ValueError, match="data.ches_filter.mode"):
        read_config(c)
    c = runs.reward_config(diagnostics=True)
    with pytest.raises(ValueError, match="train.diagnostics"):
        read_config(c)
    c = runs.dpo_config(diagnostics=True)
    c.data.format, c.loss.name = "ranked", "plackett_luce"
    with pytest.raises(ValueError, match="train.diagnostics"):
        read_config(c)


def test_scores_match_numpy_and_are_cached_by_fingerprint(tmp_path):
    """One forward-only pass gives numpy's CHES and ln-CHES for every pair (9 pairs, batches
    of 8: the second padded); a second call loads the stored file; other parameters miss."""
    model = helpers.tiny_model()
    params = helpers.init_params(model, 0)
    pairs = helpers.synthetic_pairs(9, seed=5)
    rc = read_config(runs.dpo_config())
    mesh = helpers.mesh()
    kwargs = dict(data_cfg=rc.data, step_cfg=rc.step, mesh=mesh, batch_size=8,
                  cache_dir=str(tmp_path))
    scores, info = ches_filter.ches_scores_of(model, params, pairs, **kwargs)
    want_ches, want_ln = numpy_ches(model, params, pairs)
    np.testing.assert_allclose(scores["ches"], want_ches, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(scores["ln_ches"], want_ln, rtol=1e-4, atol=1e-3)
    assert not info["reused"]
    again, info2 = ches_filter.ches_scores_of(model, params, pairs, **kwargs)
    assert info2["reused"] and info2["path"] == info["path"]
    np.testing.assert_array_equal(again["ches"], scores["ches"])
    _, other = ches_filter.ches_scores_of(model, helpers.perturbed(params), pairs, **kwargs)
    assert not other["reused"] and other["path"] != info["path"]


def test_a_dpo_run_trains_on_the_kept_pairs(tmp_path):
    """data.ches_filter drop at quantile 0.5: half the 128 train pairs are left, the summary
    records the filter, and the stored scores flag exactly the pairs that were removed."""
    c = runs.dpo_config(steps=2)
    c.data.ches_filter.update(mode="drop", quantile=0.5)
    summary = runs.run(c, tmp_path)
    train = summary["data"]["train"]
    f = train["ches_filter"]
    assert (f["pairs_before"], f["pairs_after"], train["num_pairs"]) == (128, 64, 64)
    with np.load(f["path"]) as stored:
        ln = stored["ln_ches"]
    assert f["threshold"] == pytest.approx(float(np.median(ln)))
    assert f["score_mean_after"] == pytest.approx(float(ln[ln <= np.median(ln)].mean()),
                                                  rel=1e-6)
