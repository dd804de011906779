"""The DPO train and eval steps against computations that share none of their code.

The expected numbers come from the model's logits (``Model.logits``) of each pair's chosen and
rejected sequence laid out in this file's own order (chosen_0, rejected_0, chosen_1, ...), with
the response span taken from the pair itself, never from the batch's ``loss_mask`` or row
layout: float64 numpy for the metrics, a direct ``jax.grad`` of the paper's formula for the
update. So a step that splits chosen from rejected the wrong way round, scores the wrong
positions, clips in the wrong place or counts padding pairs in a mean disagrees with them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import eval_metrics
from dpo_jax.logprobs import LogprobConfig
from dpo_jax.step import make_eval_step, make_train_step
from dpo_jax.train_state import Frozen
from tests import helpers

jax.config.update("jax_default_matmul_precision", "highest")

BETA = 0.5
# float32 step vs float64 numpy on the same float32 logits: summed log-probs of ~25 tokens
# agree to ~1e-5 nats.
TOL = dict(rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------- independent reference


def own_layout(pairs):
    """``(ids, positions, segment_ids, response)`` [2B, L]: row 2i = prompt + chosen of pair i,
    row 2i+1 = prompt + rejected, right-padded; ``response`` is 1 on the response tokens."""
    seqs = [(np.concatenate([p["prompt"], resp]), len(p["prompt"]))
            for p in pairs for resp in (p["chosen"], p["rejected"])]
    length = max(len(s) for s, _ in seqs)
    ids = np.zeros((len(seqs), length), np.int32)
    positions = np.zeros_like(ids)
    segments = np.zeros_like(ids)
    response = np.zeros(ids.shape, np.float32)
    for r, (tokens, prompt_len) in enumerate(seqs):
        ids[r, :len(tokens)] = tokens
        positions[r, :len(tokens)] = np.arange(len(tokens))
        segments[r, :len(tokens)] = 1
        response[r, prompt_len:len(tokens)] = 1.0
    return ids, positions, segments, response


def numpy_logps(model, params, pairs):
    """float64 ``(chosen [B], rejected [B])`` summed response log-probs from the logits."""
    ids, positions, segments, response = own_layout(pairs)
    logits = np.asarray(jax.jit(model.logits)(params, ids, positions, segments), np.float64)
    logits = logits[:, :-1]  # position t predicts token t + 1
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    token = np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    sums = (token * response[:, 1:]).sum(1)
    return sums[0::2], sums[1::2]


def numpy_dpo(policy, reference, beta=BETA):
    """Per-pair DPO terms (Rafailov et al. 2023, Eq. 7) from (chosen, rejected) log-prob sums."""
    chosen = beta * (policy[0] - reference[0])
    rejected = beta * (policy[1] - reference[1])
    return {
        "loss": np.logaddexp(0.0, -(chosen - rejected)),  # -log sigmoid(beta h)
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "rewards/accuracies": (chosen > rejected).astype(np.float64),
        "logps/chosen": policy[0],
        "logps/rejected": policy[1],
    }


def jax_dpo_loss(model, params, ref_params, pairs, beta=BETA):
    """The same mean DPO loss in float32 jax, for its gradient (full log-softmax, no chunks)."""
    ids, positions, segments, response = own_layout(pairs)

    def logps(p):
        logp = jax.nn.log_softmax(model.logits(p, ids, positions, segments)[:, :-1], axis=-1)
        token = jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        sums = (token * response[:, 1:]).sum(1)
        return sums[0::2], sums[1::2]

    pi_w, pi_l = logps(params)
    ref_w, ref_l = jax.lax.stop_gradient(logps(ref_params))
    h = (pi_w - ref_w) - (pi_l - ref_l)
    return jnp.mean(-jax.nn.log_sigmoid(beta * h))


# ----------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def setup():
    """A tiny model whose policy and reference differ (so every pair has a non-zero reward of
    either sign), 8 synthetic pairs, and a jitted train step (plain SGD, lr 1) over them."""
    model = helpers.tiny_model()
    params = helpers.init_params(model, 0)
    tx, schedule = helpers.optimizer()
    return dict(model=model, params=params, ref_params=helpers.perturbed(params, 0.02),
                pairs=helpers.synthetic_pairs(8), tx=tx,
                train_step=_train_step(model, tx, schedule))


def _train_step(model, tx, schedule, **step_fields):
    step = make_train_step(model, helpers.loss_config(beta=BETA), tx, schedule,
                           helpers.step_config(**step_fields))
    return jax.jit(step, static_argnums=2)


def _eval_step(model, **step_fields):
    step = make_eval_step(model, helpers.loss_config(beta=BETA), helpers.step_config(**step_fields))
    return jax.jit(step, static_argnums=3)


# ----------------------------------------------------------------------- orientation


def test_step_metrics_match_numpy_on_the_models_logits(setup):
    """Chosen and rejected come out of the step the way round the pairs say: loss, rewards,
    accuracy and log-probs of the train step and the eval step equal numpy's from the logits of
    each pair's own sequences."""
    model, params, ref_params, pairs = (setup[k] for k in ("model", "params", "ref_params",
                                                           "pairs"))
    policy = numpy_logps(model, params, pairs)
    reference = numpy_logps(model, ref_params, pairs)
    want = {k: float(np.mean(v)) for k, v in numpy_dpo(policy, reference).items()}
    swapped = {k: float(np.mean(v))
               for k, v in numpy_dpo(policy[::-1], reference[::-1]).items()}
    # The test can tell the two orientations apart: each metric moves by far more than TOL.
    for k in ("loss", "rewards/chosen", "rewards/margins", "logps/chosen", "rewards/accuracies"):
        assert abs(want[k] - swapped[k]) > 100 * TOL["atol"], k

    state = helpers.train_state(model, params, setup["tx"], ref_params=ref_params)
    batch, max_scored = helpers.device_batch(helpers.pair_batch(pairs))
    _, metrics = setup["train_step"](state, batch, max_scored)
    metrics = jax.device_get(metrics)
    for k, v in want.items():
        np.testing.assert_allclose(metrics[k], v, err_msg=k, **TOL)

    pairs_of = jax.device_get(_eval_step(model)(params, Frozen(reference=ref_params), batch, max_scored))
    for k, v in want.items():
        assert pairs_of[k][1] == len(pairs), k
        np.testing.assert_allclose(pairs_of[k][0] / pairs_of[k][1], v, err_msg=k, **TOL)


def test_policy_equal_to_reference_gives_exactly_ln2(setup):
    """At step 0 (policy = reference) every pair's loss is log 2 and every reward 0."""
    model, params, pairs = setup["model"], setup["params"], setup["pairs"]
    state = helpers.train_state(model, params, setup["tx"], ref_params=params)
    _, metrics = setup["train_step"](state, *helpers.device_batch(helpers.pair_batch(pairs)))
    metrics = jax.device_get(metrics)
    np.testing.assert_allclose(metrics["loss"], np.log(2.0), rtol=1e-6)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert metrics[k] == 0.0, k


def test_padding_pairs_in_a_train_batch_change_nothing(setup):
    """A batch of 4 real and 4 padding pairs: the step's metrics are numpy's means over the 4
    real pairs and its gradient is that of the real pairs' mean loss (``grad_norm``)."""
    model, params, ref_params = setup["model"], setup["params"], setup["ref_params"]
    pairs = helpers.synthetic_pairs(12, seed=3)
    batch_np = list(helpers.pipeline(pairs, 8))[1]
    assert batch_np["pair_weight"].tolist() == [1.0] * 4 + [0.0] * 4
    real = pairs[8:]
    want = {k: float(np.mean(v)) for k, v in numpy_dpo(numpy_logps(model, params, real),
                                                       numpy_logps(model, ref_params, real)).items()}
    grads = jax.jit(jax.grad(lambda p: jax_dpo_loss(model, p, ref_params, real)))(params)

    state = helpers.train_state(model, params, setup["tx"], ref_params=ref_params)
    _, metrics = setup["train_step"](state, *helpers.device_batch(batch_np))
    metrics = jax.device_get(metrics)
    for k, v in want.items():
        np.testing.assert_allclose(metrics[k], v, err_msg=k, **TOL)
    np.testing.assert_allclose(metrics["grad_norm"], helpers.global_norm(grads), rtol=1e-4)


def test_accumulated_micro_batches_give_the_big_batch_update(setup):
    """grad_accum=4 (strided micro-batches of 2 pairs) gives the one-batch update and metrics."""
    model, params, ref_params, pairs = (setup[k] for k in ("model", "params", "ref_params",
                                                           "pairs"))
    tx, schedule = helpers.optimizer()
    batch, max_scored = helpers.device_batch(helpers.pair_batch(pairs))
    outputs = []
    for step in (setup["train_step"], _train_step(model, tx, schedule, grad_accum=4)):
        state = helpers.train_state(model, params, tx, ref_params=ref_params)
        outputs.append(jax.device_get(step(state, batch, max_scored)))
    (want_state, want), (got_state, got) = outputs
    for k in ("loss", "rewards/margins", "rewards/accuracies", "logps/rejected", "grad_norm"):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for g, w in zip(helpers.leaves(got_state.trainable), helpers.leaves(want_state.trainable)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_nonfinite_loss_with_skip_keeps_the_parameters(setup):
    """``on_nonfinite='skip'`` reaches the update: a NaN reference makes the loss NaN, the
    step is flagged and the parameters stay as they were."""
    model, params, pairs = setup["model"], setup["params"], setup["pairs"]
    ref_params = jax.tree.map(lambda x: x * np.nan, params)
    tx, schedule = helpers.optimizer()
    step = jax.jit(make_train_step(model, helpers.loss_config(beta=BETA), tx, schedule,
                                   helpers.step_config(), on_nonfinite="skip"),
                   static_argnums=2)
    state = helpers.train_state(model, params, tx, ref_params=ref_params)
    before = helpers.leaves(state.trainable)
    new_state, metrics = step(state, *helpers.device_batch(helpers.pair_batch(pairs)))
    assert float(metrics["nonfinite"]) == 1.0 and int(new_state.step) == 1
    for a, b in zip(helpers.leaves(new_state.trainable), before):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------- clipping


def test_clipped_sgd_step_equals_the_hand_computed_update(setup):
    """SGD with the global-norm clip engaged: params - lr * g * clip / ||g||, g the gradient of
    the paper's loss (``jax.grad`` of this file's own formula), and grad_norm = ||g|| before
    clipping. Clipping the update after the optimizer, or not at all, moves params by
    lr * ||g|| / clip = 2 or 4 times as far."""
    model, params, ref_params, pairs = (setup[k] for k in ("model", "params", "ref_params",
                                                           "pairs"))
    grads = jax.jit(jax.grad(lambda p: jax_dpo_loss(model, p, ref_params, pairs)))(params)
    norm = helpers.global_norm(grads)
    lr, clip = 0.5, 0.25 * norm
    want = [-lr * clip / norm * np.asarray(g, np.float64) for g in helpers.leaves(grads)]

    tx, schedule = helpers.optimizer(lr=lr, max_grad_norm=clip)
    state = helpers.train_state(model, params, tx, ref_params=ref_params)
    before = helpers.leaves(state.trainable)
    batch, max_scored = helpers.device_batch(helpers.pair_batch(pairs))
    new_state, metrics = _train_step(model, tx, schedule)(state, batch, max_scored)
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-4)
    assert float(metrics["lr"]) == lr and int(new_state.step) == 1
    scale = max(np.abs(w).max() for w in want)
    for got_after, got_before, w in zip(helpers.leaves(new_state.trainable), before, want):
        np.testing.assert_allclose(got_after - got_before, w, rtol=1e-3, atol=1e-4 * scale)


# ----------------------------------------------------------------------- padded evaluation


@pytest.mark.parametrize("layout", [
    dict(),
    dict(packing=True, pack_length=48, row_multiple=8),  # two sequences per row
], ids=["one_sequence_per_row", "packed"])
def test_padded_final_eval_batch_gives_the_unpadded_mean(setup, layout):
    """12 held-out pairs in eval batches of 8: the second batch carries 4 padding pairs
    (``pair_weight`` 0, copies of pair 0). Summed over batches and divided by the summed weight
    by the loop's eval reducer, the eval step's numbers are numpy's means over the 12 real
    pairs. (The forward-only head runs in 8-position chunks over 48-token vocabulary slices.)"""
    model, params, ref_params = setup["model"], setup["params"], setup["ref_params"]
    pairs = helpers.synthetic_pairs(12, seed=3)
    batches = list(helpers.pipeline(pairs, 8, **layout))
    assert [b["pair_weight"].tolist() for b in batches] == [[1.0] * 8, [1.0] * 4 + [0.0] * 4]
    assert ("seq_index" in batches[0]) == bool(layout)

    eval_step = _eval_step(model, forward_logprobs=LogprobConfig(seq_chunk=8, vocab_chunk=48))
    sums = [eval_step(params, Frozen(reference=ref_params), *helpers.device_batch(b))
            for b in batches]
    assert [float(s["loss"][1]) for s in sums] == [8.0, 4.0]
    means = eval_metrics.reduce(lambda s: s, sums)  # the one eval reduction

    terms = numpy_dpo(numpy_logps(model, params, pairs), numpy_logps(model, ref_params, pairs))
    for k, v in terms.items():
        # Padding counted in the mean (as 4 more copies of pair 0) would move it by far more
        # than the tolerance.
        padded = (v.sum() + 4 * v[0]) / 16
        assert abs(padded - v.mean()) > 100 * TOL["atol"], k
        np.testing.assert_allclose(means[k], v.mean(), err_msg=k, **TOL)
