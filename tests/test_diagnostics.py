"""Per-pair diagnostics (``dpo_jax/diagnostics.py``, ``train.diagnostics``) against computations
that share none of their code.

CHES (Razin et al. 2024, Definition 2) and ln-CHES are recomputed in float64 numpy from
``Model.hidden`` of each pair's chosen and rejected sequence laid out one per row
(``test_step.own_layout``), the positions taken from the pair itself; the log-prob changes,
the fraction of pairs whose chosen log-prob fell and the margin histogram from
``test_step.numpy_logps``. The step computes them from the training forward's hidden states in
every batch layout (unpacked, packed, prefix-shared) and mesh shape.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from dpo_jax import diagnostics, eval_metrics, eval_pairs, loop
from dpo_jax.batch_format import infer
from dpo_jax.step import StepConfig, make_eval_step, make_train_step, sequence_stats
from tests import helpers
from tests.test_step import BETA, numpy_logps, own_layout

jax.config.update("jax_default_matmul_precision", "highest")

LAYOUTS = {"unpacked": {}, "packed": dict(packing=True, row_multiple=8),
           "prefix_shared": dict(prefix_sharing=True, packing=True, row_multiple=8)}


@pytest.fixture(scope="module")
def setup():
    model = helpers.tiny_model()
    params = helpers.init_params(model, 0)
    tx, schedule = helpers.optimizer()
    return dict(model=model, params=params, ref_params=helpers.perturbed(params, 0.1),
                pairs=helpers.synthetic_pairs(8), tx=tx, schedule=schedule)


def numpy_ches(model, params, pairs):
    """float64 ``(ches [B], ln_ches [B])`` straight from the definition: per sequence, the sum
    of the hidden states at the positions that predict its response tokens (the last prompt
    token through the second-to-last response token)."""
    ids, positions, segments, response = own_layout(pairs)
    h = np.asarray(jax.jit(model.hidden)(params, ids, positions, segments), np.float64)
    sums = (h[:, :-1] * response[:, 1:, None]).sum(1)  # h at t - 1 predicts token t
    lengths = response[:, 1:].sum(1)
    c, r, lc, lr = sums[0::2], sums[1::2], lengths[0::2], lengths[1::2]
    want_len = np.asarray([[len(p["chosen"]), len(p["rejected"])] for p in pairs])
    np.testing.assert_array_equal(np.stack([lc, lr], 1), want_len)
    ches = (c * r).sum(1) - (c * c).sum(1)
    ln_ches = (c * r).sum(1) / (lc * lr) - (c * c).sum(1) / lc**2
    return ches, ln_ches


def numpy_diagnostics(model, params, ref_params, pairs):
    """Per-pair float64 values: log-prob changes, reward margins (DPO, beta = BETA), CHES."""
    pc, pr = numpy_logps(model, params, pairs)
    rc, rr = numpy_logps(model, ref_params, pairs)
    ches, ln_ches = numpy_ches(model, params, pairs)
    return dict(chosen_logps=pc, rejected_logps=pr, chosen_delta=pc - rc,
                rejected_delta=pr - rr, margin=BETA * ((pc - rc) - (pr - rr)), ches=ches,
                ln_ches=ln_ches)


def hand_metrics(v) -> dict[str, float]:
    """The step's diagnostics metrics from per-pair values: means over the pairs, histogram
    bins as counts (bin edges written out here, not read from the module)."""
    edges = [-math.inf, -4, -2, -1, -0.5, 0, 0.5, 1, 2, 4, math.inf]
    names = ["-inf_-4", "-4_-2", "-2_-1", "-1_-0.5", "-0.5_0", "0_0.5", "0.5_1", "1_2", "2_4",
             "4_inf"]
    out = {"ches/mean": v["ches"].mean(), "ln_ches/mean": v["ln_ches"].mean(),
           "logps_delta/chosen": v["chosen_delta"].mean(),
           "logps_delta/rejected": v["rejected_delta"].mean(),
           "displacement/chosen_fell": (v["chosen_delta"] < 0).mean(),
           "displacement/both_fell": ((v["chosen_delta"] < 0) & (v["rejected_delta"] < 0)).mean()}
    for name, lo, hi in zip(names, edges[:-1], edges[1:]):
        out["margins_hist/" + name] = float(((v["margin"] >= lo) & (v["margin"] < hi)).sum())
    return out


def _close(got, want, err_msg=""):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3, err_msg=err_msg)


@pytest.mark.parametrize("layout,mesh_shape", [
    ("unpacked", {"data": -1, "fsdp": 1, "tensor": 1}),
    ("unpacked", {"data": 2, "fsdp": 2, "tensor": 2}),
    ("packed", {"data": 2, "fsdp": 2, "tensor": 2}),
    ("prefix_shared", {"data": 1, "fsdp": 4, "tensor": 2}),
])
def test_ches_from_the_forward_matches_numpy(setup, layout, mesh_shape):
    """Hidden-state sums from the log-prob forward give numpy's CHES and ln-CHES, in every
    layout (seq_index slots for packed and prefix-shared rows) and mesh shape."""
    model, params, pairs = setup["model"], setup["params"], setup["pairs"]
    want_ches, want_ln = numpy_ches(model, params, pairs)
    assert np.ptp(want_ches) > 10 * 1e-3 and (want_ches < 0).any()  # scores differ across pairs
    batch_np = helpers.pair_batch(pairs, **LAYOUTS[layout])
    mesh = helpers.mesh(mesh_shape)
    batch, max_scored = helpers.device_batch(batch_np, mesh)
    params_m = jax.device_put(params, jax.tree.map(lambda x: x.sharding, helpers.train_state(
        model, params, setup["tx"], mesh_=mesh).trainable))

    def scores(p, b):
        s = sequence_stats(model, p, b, helpers.step_config(), max_scored, with_hidden=True,
                           fmt=infer(b))
        c, r = np.split(np.arange(s.lengths.shape[0]), 2)
        return diagnostics.ches_scores(s.hidden_sums[c], s.hidden_sums[r], s.lengths[c],
                                       s.lengths[r])

    ches, ln_ches = jax.device_get(jax.jit(scores)(params_m, batch))
    _close(ches, want_ches, "ches")
    _close(ln_ches, want_ln, "ln_ches")


def test_train_metrics_match_hand_computation_and_accumulate(setup):
    """The train step's diagnostics metrics are the hand computation's (means over pairs,
    histogram counts), the same with grad_accum=2 (micro-batch counts add up)."""
    model, params, ref_params, pairs = (setup[k] for k in ("model", "params", "ref_params",
                                                           "pairs"))
    want = hand_metrics(numpy_diagnostics(model, params, ref_params, pairs))
    margins = numpy_diagnostics(model, params, ref_params, pairs)["margin"]
    edges = np.asarray(diagnostics.MARGIN_EDGES)
    assert np.abs(margins[:, None] - edges).min() > 1e-3  # no margin on a bin edge
    assert sum(v > 0 for k, v in want.items() if k.startswith("margins_hist/")) >= 2
    batch, max_scored = helpers.device_batch(helpers.pair_batch(pairs))
    for accum in (1, 2):
        step = jax.jit(make_train_step(model, helpers.loss_config(beta=BETA), setup["tx"],
                                       setup["schedule"],
                                       StepConfig(grad_accum=accum, diagnostics=True)),
                       static_argnums=2)
        state = helpers.train_state(model, params, setup["tx"], ref_params=ref_params)
        _, metrics = jax.device_get(step(state, batch, max_scored))
        assert set(want) <= set(metrics)
        for k, v in want.items():
            _close(metrics[k], v, f"{k} (grad_accum={accum})")


@pytest.mark.default_emitters  # bit for bit across two programs (conftest.py)
def test_loss_and_update_are_bit_identical_with_diagnostics(setup):
    """Diagnostics are metrics only: the loss, the gradient norm and every updated parameter
    are the same bits with them on and off (grad_accum=2, the scan path)."""
    model, params, ref_params, pairs = (setup[k] for k in ("model", "params", "ref_params",
                                                           "pairs"))
    batch, max_scored = helpers.device_batch(helpers.pair_batch(pairs))
    out = []
    for diag in (False, True):
        cfg = StepConfig(grad_accum=2, diagnostics=diag)
        step = jax.jit(make_train_step(model, helpers.loss_config(beta=BETA), setup["tx"],
                                       setup["schedule"], cfg), static_argnums=2)
        state = helpers.train_state(model, params, setup["tx"], ref_params=ref_params)
        out.append(jax.device_get(step(state, batch, max_scored)))
    (s0, m0), (s1, m1) = out
    assert "ches/mean" in m1 and "ches/mean" not in m0
    for k in m0:
        assert np.array_equal(m0[k], m1[k]), k
    for a, b in zip(helpers.leaves(s0.trainable), helpers.leaves(s1.trainable)):
        assert np.array_equal(a, b)


def test_eval_means_counts_and_per_pair_file(setup, tmp_path):
    """12 pairs in eval batches of 8 (4 padding pairs): the eval metrics are the 12 pairs'
    means and counts, ``eval_pairs/step_<n>.jsonl`` holds each real pair once under its index
    with numpy's values, and the quantiles of CHES are numpy's over the 12."""
    model, params, ref_params = setup["model"], setup["params"], setup["ref_params"]
    pairs = helpers.synthetic_pairs(12, seed=3)
    want_pairs = numpy_diagnostics(model, params, ref_params, pairs)
    want = hand_metrics(want_pairs)
    stream = helpers.pipeline(pairs, 8)
    cfg = StepConfig(diagnostics=True)
    eval_step = make_eval_step(model, helpers.loss_config(beta=BETA), cfg)
    log = eval_pairs.EvalPairs(str(tmp_path), {"train": None, "eval": stream})
    totals_of = loop.eval_totals(lambda s, b, n: eval_step(s.trainable, s.frozen, b, n),
                                 stream, helpers.mesh(), True, per_example=log.sink)
    evaluate = log.wrap(lambda state: eval_metrics.means(totals_of(state)))
    state = helpers.train_state(model, params, setup["tx"], ref_params=ref_params)
    metrics = evaluate(state)
    for k, v in want.items():
        _close(metrics[k], v, k)
    assert sum(metrics[k] for k in want if k.startswith("margins_hist/")) == 12
    np.testing.assert_allclose(metrics["ches/q50"], np.quantile(want_pairs["ches"], 0.5),
                               rtol=1e-4)
    rows = eval_pairs.read(str(tmp_path))[0]
    assert [r["index"] for r in rows] == list(range(12))
    assert {r["split"] for r in rows} == {"eval"} and all(r["weight"] == 1.0 for r in rows)
    for name, values in want_pairs.items():
        _close([r[name] for r in rows], values, name)


def test_counts_and_per_example_in_the_eval_reduction():
    """A denominator of 0 declares a total: summed, not divided; an empty mean still reads 0.
    Per-example arrays go to the sink in batch order and never into the totals."""
    batches = [{"a": (2.0, 1.0), "n": (3.0, 0.0), "e": (0.0, 0.0),
                eval_metrics.PER_EXAMPLE: {"x": np.array([1.0, 2.0])}},
               {"a": (4.0, 3.0), "n": (1.0, 0.0), "e": (0.0, 0.0),
                eval_metrics.PER_EXAMPLE: {"x": np.array([3.0])}}]
    seen = []
    totals = eval_metrics.totals(lambda b: b, batches, per_example=lambda v: seen.append(v["x"]))
    assert eval_metrics.means(totals) == {"a": 1.5, "n": 4.0, "e": 0.0}
    assert [list(x) for x in seen] == [[1.0, 2.0], [3.0]]
    assert eval_metrics.PER_EXAMPLE not in eval_metrics.totals(lambda b: b, batches)
