"""TR-DPO (``train.ref_sync_every`` / ``train.ref_mixup_alpha``): the reference update inside the
jitted DPO step against its formula, shardings kept, refusals, and exact resume with the
updated reference saved in each checkpoint."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dpo_jax import loop
from dpo_jax.config import base_config, read_config
from dpo_jax.step import StepConfig, make_train_step
from tests import helpers, runs


def _step(model, tx, schedule, every, alpha, loss="sigmoid"):
    cfg = StepConfig(ref_sync_every=every, ref_mixup_alpha=alpha)
    return make_train_step(model, helpers.loss_config(loss, beta=0.5), tx, schedule, cfg)


@pytest.mark.parametrize("alpha", [0.5, pytest.param(1.0, marks=pytest.mark.slow)])
def test_reference_mixes_every_tau_steps_and_keeps_shardings(alpha):
    model = helpers.tiny_model()
    params = helpers.init_params(model, seed=0)
    ref0 = helpers.perturbed(params, scale=0.05, seed=4)
    ref0_np = helpers.leaves(ref0)  # host copy: the step donates the state
    tx, schedule = helpers.optimizer(lr=0.1)
    state = helpers.train_state(model, params, tx, ref_params=ref0)
    shardings = jax.tree.map(lambda x: x.sharding, state.frozen.reference)
    step = loop.jit_train_step(_step(model, tx, schedule, every=2, alpha=alpha), state)
    batch, max_scored = helpers.device_batch(helpers.pair_batch(helpers.synthetic_pairs(8)))

    state, _ = step(state, batch, max_scored)  # step 1: not a multiple of 2, reference kept
    for a, b in zip(helpers.leaves(state.frozen.reference), ref0_np):
        np.testing.assert_array_equal(a, b)
    state, _ = step(state, batch, max_scored)  # step 2: ref = alpha * policy + (1 - alpha) * ref
    policy = helpers.leaves(state.trainable)
    for got, p, r in zip(helpers.leaves(state.frozen.reference), policy, ref0_np):
        want = (alpha * p.astype(np.float64) + (1 - alpha) * r.astype(np.float64))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
        if alpha == 1.0:
            np.testing.assert_array_equal(got, p)
    assert any(not np.array_equal(p, r) for p, r in zip(policy, ref0_np))
    for x, s in zip(jax.tree.leaves(state.frozen.reference), jax.tree.leaves(shardings)):
        assert x.sharding.is_equivalent_to(s, x.ndim)

    # Unjitted shardings are not pinned: the mix itself keeps them.
    plain = jax.jit(_step(model, tx, schedule, every=1, alpha=alpha), static_argnums=2)
    state2, _ = plain(state, batch, max_scored)
    for x, s in zip(jax.tree.leaves(state2.frozen.reference), jax.tree.leaves(shardings)):
        assert x.sharding.is_equivalent_to(s, x.ndim)


@pytest.mark.slow  # builds a run per case; the config-level refusals are fast elsewhere
def test_refused_with_precomputed_reference_or_reference_free_loss():
    c = base_config()
    c.train.ref_sync_every = 4
    for fields, message in [
        ({"logprobs.precompute_reference": True}, "ref_sync_every.*precompute_reference"),
        ({"logprobs.precompute_reference": False, "loss.name": "simpo"},
         "ref_sync_every.*reference-free"),
        ({"loss.name": "sigmoid", "train.ref_mixup_alpha": 0.0}, "ref_mixup_alpha"),
    ]:
        c.update_from_flattened_dict(fields)
        with pytest.raises(ValueError, match=message):
            read_config(c)
    c.train.ref_mixup_alpha = 1.0
    assert read_config(c).step.ref_sync_every == 4
    model = helpers.tiny_model()
    tx, schedule = helpers.optimizer()
    with pytest.raises(ValueError, match="reference-free"):
        _step(model, tx, schedule, every=2, alpha=0.5, loss="simpo")
    state = helpers.train_state(model, helpers.init_params(model), tx)  # no reference params
    batch, max_scored = helpers.device_batch(helpers.pair_batch(helpers.synthetic_pairs(8)))
    batch = dict(batch, ref_logps=batch["pair_weight"].repeat(2), ref_lengths=batch["pair_weight"].repeat(2))
    with pytest.raises(ValueError, match="precomputed"):
        _step(model, tx, schedule, every=2, alpha=0.5)(state, batch, max_scored)


@pytest.mark.slow  # a second resume variant; test_resume.py's are fast
def test_interrupted_trdpo_run_resumes_bit_for_bit(tmp_path):
    """Reference synced at steps 3 and 6; cut after step 5 (checkpoint at 4 holds the step-3
    reference): the rerun ends with the uninterrupted run's parameters and log."""
    config = runs.dpo_config(steps=6, checkpoint_every=2, ref_sync_every=3, ref_mixup_alpha=0.5)
    _, _, want = runs.resume_matches_full_run(config, tmp_path, interrupt_after=5, resumed_from=4)
    frozen = runs.dpo_config(steps=6)
    runs.run(frozen, tmp_path / "frozen")
    losses = {r["step"]: r["loss"] for r in runs.records(tmp_path / "frozen") if "loss" in r}
    trdpo = {r["step"]: r["loss"] for r in want if "loss" in r}
    assert all(trdpo[s] == losses[s] for s in (1, 2, 3))  # identical until the first sync
    assert trdpo[4] != losses[4]  # the synced reference changes the loss from step 4 on
