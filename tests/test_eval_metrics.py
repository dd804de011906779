"""Eval metrics as (numerator, denominator) pairs reduced once (``dpo_jax.eval_metrics``).

The reduction against numpy on hand-chosen pairs whose denominators differ; then a task's own
metrics added to the DPO eval step (a per-token mean and an accuracy over one bucket of pairs,
each with its own denominator) through the loop's evaluator over padded eval batches on two
meshes, against float64 numpy on the model's logits of each pair's own sequences
(``tests/test_step.py``'s independent reference)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import eval_metrics, loop
from dpo_jax.logprobs import LogprobConfig
from dpo_jax.step import make_eval_step
from tests import helpers
from tests.test_step import BETA, TOL, numpy_dpo, numpy_logps

jax.config.update("jax_default_matmul_precision", "highest")


def test_each_metric_is_its_summed_numerator_over_its_summed_denominator():
    rng = np.random.default_rng(0)
    batches = [{"per_pair": (rng.normal(), 8.0), "per_token": (rng.normal() * 50, float(n)),
                "bucket": (float(k), float(m))}
               for n, k, m in ((173, 2, 3), (41, 0, 0), (96, 1, 4))]
    got = eval_metrics.reduce(lambda b: b, batches)
    for name in ("per_pair", "per_token", "bucket"):
        num = np.array([b[name][0] for b in batches], np.float64)
        den = np.array([b[name][1] for b in batches], np.float64)
        assert got[name] == pytest.approx(num.sum() / den.sum(), rel=1e-12), name
    # Not the mean of the batches' ratios, and a batch without any of a bucket adds nothing.
    assert got["per_token"] != pytest.approx(np.mean([b["per_token"][0] / b["per_token"][1]
                                                      for b in batches]), rel=1e-3)
    assert got["bucket"] == 3 / 7
    # derived values come from the means; a denominator of 0 reads as 0, not NaN
    out = eval_metrics.means({"nll": (6.0, 4.0), "empty": (0.0, 0.0)},
                             derived=lambda m: {"ppl": float(np.exp(m["nll"]))})
    assert out == {"nll": 1.5, "empty": 0.0, "ppl": pytest.approx(np.exp(1.5))}
    with pytest.raises(ValueError, match="'loss' is float.*\\(numerator, denominator\\)"):
        eval_metrics.reduce(lambda b: {"loss": 1.0}, [0])


def _own_metrics(policy, out, batch):
    """A task's metrics: the per-token mean chosen log-prob (denominator: the chosen response
    tokens of real pairs) and the accuracy over the pairs whose chosen response is longer than
    the rejected one (denominator: those pairs)."""
    w = batch["pair_weight"].astype(jnp.float32)
    long_w = w * (policy.chosen_lengths > policy.rejected_lengths)
    correct = out.chosen_rewards > out.rejected_rewards
    return {"logps/chosen_per_token": (jnp.sum(w * policy.chosen_logps),
                                       jnp.sum(w * policy.chosen_lengths)),
            "rewards/accuracies_long_chosen": (jnp.sum(long_w * correct), jnp.sum(long_w))}


@pytest.mark.parametrize("mesh_shape", [None, {"data": 2, "fsdp": 2, "tensor": 2}],
                         ids=["data8", "data2_fsdp2_tensor2"])
def test_a_task_metric_with_its_own_denominator_matches_numpy(mesh_shape):
    """20 held-out pairs in eval batches of 8 (the last padded with 4 pairs of weight 0): the
    DPO metrics keep their pair-weight means and the two added metrics are numpy's ratios over
    the real pairs, each with its own denominator."""
    model = helpers.tiny_model()
    params = helpers.init_params(model, 0)
    ref_params = helpers.perturbed(params, 0.02)
    pairs = helpers.synthetic_pairs(20, seed=7)
    batches = list(helpers.pipeline(pairs, 8))
    assert [float(b["pair_weight"].sum()) for b in batches] == [8.0, 8.0, 4.0]

    step_cfg = helpers.step_config(forward_logprobs=LogprobConfig(seq_chunk=8, vocab_chunk=48))
    eval_step = make_eval_step(model, helpers.loss_config(beta=BETA), step_cfg,
                               extra_metrics=_own_metrics)
    mesh = helpers.mesh(mesh_shape)
    evaluate = loop.evaluator(lambda s, b, n: eval_step(s.trainable, s.frozen, b, n), batches,
                              mesh, step_cfg.logprobs.scored_only)
    got = evaluate(helpers.train_state(model, params, helpers.optimizer()[0], ref_params, mesh))

    policy = numpy_logps(model, params, pairs)
    terms = numpy_dpo(policy, numpy_logps(model, ref_params, pairs))
    for k, v in terms.items():
        np.testing.assert_allclose(got[k], v.mean(), err_msg=k, **TOL)
    chosen_len = np.array([len(p["chosen"]) for p in pairs], np.float64)
    rejected_len = np.array([len(p["rejected"]) for p in pairs], np.float64)
    per_token = policy[0].sum() / chosen_len.sum()
    assert abs(per_token - policy[0].mean()) > 100 * TOL["atol"]  # another denominator
    np.testing.assert_allclose(got["logps/chosen_per_token"], per_token, **TOL)
    long = chosen_len > rejected_len
    assert 0 < long.sum() < len(pairs)
    correct = terms["rewards/accuracies"] > 0
    want = correct[long].mean()
    assert abs(want - correct.mean()) > 0.01  # the bucket's accuracy is not the overall one
    assert got["rewards/accuracies_long_chosen"] == pytest.approx(want, abs=1e-12)
