"""``dpo_jax.optim.apply_gradients``: the update every task's step ends with, and its guard
against non-finite losses and gradients (flag with 'error'; drop the update with 'skip')."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.optim import apply_gradients
from dpo_jax.state import TrainState
from tests import helpers


def _state(tx):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    return TrainState(step=jnp.asarray(5, jnp.int32), params=params, ref_params=None,
                      opt_state=tx.init(params))


def _grads(bad=None):
    rng = np.random.default_rng(1)
    grads = {"w": rng.normal(size=(3, 4)).astype(np.float32),
             "b": rng.normal(size=(4,)).astype(np.float32)}
    if bad is not None:
        grads["w"][1, 2] = bad
    return jax.tree.map(jnp.asarray, grads)


def _update(policy, grads, loss=0.5):
    # AdamW with clipping: the optimizer state holds moments and counters that must be kept too.
    tx, schedule = helpers.optimizer(name="adamw", lr=0.1, warmup_steps=3, max_grad_norm=1.0)
    state = _state(tx)
    new, metrics = jax.jit(
        lambda s, g, l: apply_gradients(s, g, l, tx, schedule, policy))(state, grads, loss)
    return state, new, jax.device_get(metrics), schedule


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_finite_update_is_applied_and_reported(policy):
    grads = _grads()
    state, new, metrics, schedule = _update(policy, grads)
    assert metrics["nonfinite"] == 0.0
    np.testing.assert_allclose(metrics["grad_norm"], helpers.global_norm(grads), rtol=1e-6)
    np.testing.assert_allclose(metrics["lr"], float(schedule(5)), rtol=1e-7)
    assert int(new.step) == 6
    for a, b in zip(helpers.leaves(new.params), helpers.leaves(state.params)):
        assert np.all(np.isfinite(a)) and not np.array_equal(a, b)


@pytest.mark.parametrize("bad_grad,loss", [(np.nan, 0.5), (np.inf, 0.5), (None, np.nan),
                                           (None, np.inf)])
def test_nonfinite_is_flagged_and_skip_keeps_params_and_optimizer_state(bad_grad, loss):
    grads = _grads(bad_grad)
    _, applied, metrics, _ = _update("error", grads, loss)
    assert metrics["nonfinite"] == 1.0
    assert int(applied.step) == 6

    state, skipped, metrics, _ = _update("skip", grads, loss)
    assert metrics["nonfinite"] == 1.0
    assert int(skipped.step) == 6  # the step counter advances past the dropped update
    for a, b in zip(helpers.leaves((skipped.params, skipped.opt_state)),
                    helpers.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, b)


def test_unknown_policy_is_an_error():
    with pytest.raises(ValueError, match="on_nonfinite='ignore'"):
        _update("ignore", _grads())
