"""``dpo_jax.optim.apply_gradients``: the update every task's step ends with, and its guard
against non-finite losses and gradients (flag with 'error'; drop the update with 'skip')."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpo_jax.optim import apply_gradients
from dpo_jax.state import TrainState
from tests import helpers


def _state(tx, step=1):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
    return TrainState(step=jnp.asarray(step, jnp.int32), trainable=params,
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
    return state, new, jax.device_get(metrics)


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_finite_update_is_applied_and_reported(policy):
    grads = _grads()
    state, new, metrics = _update(policy, grads)
    assert metrics["nonfinite"] == 0.0
    np.testing.assert_allclose(metrics["grad_norm"], helpers.global_norm(grads), rtol=1e-6)
    # lr of the update at step 1 of a 3-step warmup: 0.1 * (1 + 1) / (3 + 1)
    np.testing.assert_allclose(metrics["lr"], 0.05, rtol=1e-6)
    assert int(new.step) == 2
    for a, b in zip(helpers.leaves(new.trainable), helpers.leaves(state.trainable)):
        assert np.all(np.isfinite(a)) and not np.array_equal(a, b)


@pytest.mark.parametrize("bad_grad,loss", [(np.nan, 0.5), (np.inf, 0.5), (None, np.nan),
                                           (None, np.inf)])
def test_nonfinite_is_flagged_and_skip_keeps_params_and_optimizer_state(bad_grad, loss):
    grads = _grads(bad_grad)
    _, applied, metrics = _update("error", grads, loss)
    assert metrics["nonfinite"] == 1.0
    assert int(applied.step) == 2

    state, skipped, metrics = _update("skip", grads, loss)
    assert metrics["nonfinite"] == 1.0
    assert int(skipped.step) == 2  # the step counter advances past the dropped update
    for a, b in zip(helpers.leaves((skipped.trainable, skipped.opt_state)),
                    helpers.leaves((state.trainable, state.opt_state))):
        np.testing.assert_array_equal(a, b)


def test_unknown_policy_is_an_error():
    with pytest.raises(ValueError, match="on_nonfinite='ignore'"):
        _update("ignore", _grads())


def test_adamw_decays_matrices_not_vectors():
    """Decoupled weight decay (AdamW) applies to matrices only: with zero gradients a matrix
    shrinks by lr * weight_decay, a bias or norm vector stays."""
    tx, schedule = helpers.optimizer(name="adamw", lr=0.1, weight_decay=0.5)
    state = _state(tx)
    zeros = jax.tree.map(jnp.zeros_like, state.trainable)
    new, _ = apply_gradients(state, zeros, 0.0, tx, schedule)
    np.testing.assert_allclose(new.trainable["w"], state.trainable["w"] * (1 - 0.1 * 0.5), rtol=1e-6)
    np.testing.assert_array_equal(new.trainable["b"], state.trainable["b"])


def test_rmsprop_is_pytorchs_with_eps_outside_the_sqrt():
    """The paper's optimizer as PyTorch runs it, by hand: v <- 0.99 v + 0.01 g^2 from v = 0,
    p <- p - lr g / (sqrt(v) + eps). Gradients of ~1e-5 make sqrt(v) ~ 1e-6, where eps = 1e-8
    inside the sqrt would change the step a hundredfold."""
    tx, schedule = helpers.optimizer(name="rmsprop", lr=1e-2)
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=5), jnp.float32)}
    opt_state = tx.init(params)
    p, v = np.asarray(params["w"], np.float64), np.zeros(5)
    for _ in range(3):
        g = (rng.normal(size=5) * 1e-5).astype(np.float32)
        updates, opt_state = tx.update({"w": jnp.asarray(g)}, opt_state, params)
        params = optax.apply_updates(params, updates)
        v = 0.99 * v + 0.01 * g.astype(np.float64) ** 2
        p = p - 1e-2 * g / (np.sqrt(v) + 1e-8)
    np.testing.assert_allclose(params["w"], p, rtol=1e-5)
