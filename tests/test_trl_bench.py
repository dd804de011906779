"""experiments/bench/trl_vs_dpo_jax.py: its table follows from its measurements (medians,
tokens/s, ratios to TRL's default and best, the first batch's log-prob agreement), checked
against values worked out by hand. The benchmark itself (TRL and the real model) is not a test."""


import numpy as np
import pytest

from tests import helpers

bench = helpers.load_module("experiments/bench/trl_vs_dpo_jax.py")


def _result(name, steps, tokens=1000.0, chosen=(-10.0, -20.0), rejected=(-30.0, -5.0), **kw):
    return dict(config=name, step_s=list(steps), warmup=1,
                median_step_s=float(np.median(steps[1:])), tokens_per_step=tokens,
                losses=[0.6931, 0.69], peak_rss_gib=2.0,
                first_logps={"chosen": list(chosen), "rejected": list(rejected)}, **kw)


def test_ratios_speeds_and_logp_agreement_by_hand():
    results = [
        _result("trl_default", [99.0, 40.0, 36.0, 38.0]),                 # median 38
        _result("trl_precompute", [99.0, 30.0, 28.0, 29.0], precompute_s=12.0),  # median 29
        _result("jax_same_math", [5.0, 19.0, 19.0, 20.0], chosen=(-10.001, -20.0),
                rejected=(-30.0, -5.0005)),                                # median 19
        {"config": "jax_best", "error": "killed above --max_rss_gib=7.0", "peak_rss_gib": 7.1},
    ]
    rows = {r["config"]: r for r in bench.summarize(results)}
    d, p, j = rows["trl_default"], rows["trl_precompute"], rows["jax_same_math"]
    assert (d["median_step_s"], p["median_step_s"], j["median_step_s"]) == (38.0, 29.0, 19.0)
    assert (j["min_step_s"], j["max_step_s"]) == (19.0, 20.0)  # the warmup step is left out
    assert j["tokens_per_s"] == pytest.approx(1000.0 / 19.0)
    assert d["vs_trl_default"] == 1.0 and d["vs_trl_best"] == pytest.approx(29.0 / 38.0)
    assert j["vs_trl_default"] == pytest.approx(2.0) and j["vs_trl_best"] == pytest.approx(29 / 19)
    assert p["precompute_s"] == 12.0
    # sums of the 3 timed steps: 114, 87, 58 s
    assert (d["total_s"], p["total_s"], j["total_s"]) == (114.0, 87.0, 58.0)
    assert j["vs_trl_default_total"] == pytest.approx(114 / 58)
    assert j["vs_trl_best_total"] == pytest.approx(87 / 58)
    assert p["vs_trl_best_total"] == 1.0
    # |-10.001 + 10| / 10 = 1e-4 beats |-5.0005 + 5| / 5 = 1e-4 ... both 1e-4; the max of them
    assert j["max_rel_logp_diff"] == pytest.approx(1e-4, rel=1e-6)
    assert d["max_rel_logp_diff"] == 0.0
    assert rows["jax_best"]["error"].startswith("killed") and "vs_trl_default" not in rows["jax_best"]
    table = bench.markdown(bench.summarize(results))
    assert ("| jax_same_math | 19.00 [19.00, 20.00] | 53 | 2.00 | 2.00x | 1.53x | 58.0 (1.97x / "
            "1.50x) | 0.6931 | 1.0e-04 |") in table
    assert "| jax_best | error: killed above --max_rss_gib=7.0 |" in table


def test_no_trl_rows_gives_no_ratios_and_unequal_batches_are_refused():
    rows = bench.summarize([_result("jax_default", [3.0, 2.0, 4.0])])
    assert rows[0]["vs_trl_default"] is None and rows[0]["max_rel_logp_diff"] is None
    assert "| jax_default | 3.00 [2.00, 4.00] | 333 | 2.00 |  |  | 6.0 | 0.6931 |  |" in bench.markdown(rows)
    with pytest.raises(ValueError, match="different numbers of steps"):
        bench.summarize([_result("trl_default", [1.0, 1.0, 1.0]),
                         _result("jax_default", [1.0, 1.0])])
    with pytest.raises(ValueError, match="first-batch chosen log-probs"):
        bench.summarize([_result("trl_default", [1.0, 1.0]),
                         _result("jax_default", [1.0, 1.0], chosen=(-1.0,))])


def test_step_tokens_count_both_sequences_of_every_pair():
    pair = lambda p, c, r: {"prompt": np.zeros(p), "chosen": np.zeros(c), "rejected": np.zeros(r)}
    pairs = [pair(10, 3, 5)] * 8 + [pair(1, 1, 1)] * 8
    assert bench.step_tokens(pairs, 2) == [8 * (20 + 8), 8 * 4]
