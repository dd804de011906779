"""PPO math against direct loops and hand-derived values (dpo_jax/ppo/core.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.ppo import core


def _mask(lengths, n):
    return (np.arange(n)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def test_gae_matches_a_direct_loop_with_variable_lengths():
    rng = np.random.default_rng(0)
    lengths, n, gamma, lam = [5, 1, 3, 0], 5, 0.9, 0.8
    mask = _mask(lengths, n)
    rewards = rng.normal(size=(4, n)).astype(np.float32) * mask
    values = rng.normal(size=(4, n)).astype(np.float32)
    adv, ret = core.gae(jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma, lam)
    want = np.zeros((4, n), np.float32)
    for b, L in enumerate(lengths):
        last = 0.0
        for t in reversed(range(L)):
            next_v = values[b, t + 1] if t + 1 < L else 0.0
            delta = rewards[b, t] + gamma * next_v - values[b, t]
            last = delta + gamma * lam * last
            want[b, t] = last
    np.testing.assert_allclose(adv, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ret, (want + values) * mask, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(adv)[mask == 0] == 0)


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    mask = _mask([3], 4)
    rewards = np.array([[1.0, 2.0, 3.0, 0.0]], np.float32)
    values = np.array([[0.5, 0.25, 0.125, 9.0]], np.float32)
    adv, _ = core.gae(rewards, values, mask, 1.0, 1.0)
    np.testing.assert_allclose(adv, [[6 - 0.5, 5 - 0.25, 3 - 0.125, 0.0]], rtol=1e-6)


def _policy_grad(ratio, adv, clip=0.2):
    def f(logp):
        return core.policy_loss(logp, jnp.zeros(1), jnp.full(1, adv), jnp.ones(1), clip)[0]

    return float(jax.grad(f)(jnp.log(jnp.full(1, ratio)))[0])


@pytest.mark.parametrize("ratio,adv,zero", [
    (1.5, 1.0, True),    # positive advantage, ratio above 1+eps: clip binds
    (0.5, -1.0, True),   # negative advantage, ratio below 1-eps: clip binds
    (0.5, 1.0, False),   # positive advantage below the range: unclipped term is the max
    (1.5, -1.0, False),  # negative advantage above the range: still pushed back
    (1.1, 1.0, False),   # inside the range
    (0.9, -1.0, False),
])
def test_policy_gradient_is_zero_exactly_where_the_clip_binds(ratio, adv, zero):
    g = _policy_grad(ratio, adv)
    if zero:
        assert g == 0.0
    else:
        # d/dlogp of -A * r = -A * r
        assert g == pytest.approx(-adv * ratio, rel=1e-6)


def test_policy_loss_value_and_clipfrac():
    logp = jnp.log(jnp.array([[1.5, 0.5, 1.1, 2.0]]))
    adv = jnp.array([[1.0, 1.0, -2.0, 3.0]])
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])
    loss, stats = core.policy_loss(logp, jnp.zeros_like(logp), adv, mask, 0.2)
    want = np.mean([max(-1.5, -1.2), max(-0.5, -0.8), max(2.2, 2.2)])
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(stats["clipfrac"]) == pytest.approx(1 / 3)
    lr = np.log([1.5, 0.5, 1.1])
    assert float(stats["approx_kl"]) == pytest.approx(0.5 * np.mean(lr ** 2), rel=1e-5)


def test_value_clipping():
    old = jnp.array([[0.0, 0.0, 0.0]])
    ret = jnp.array([[1.0, 1.0, -1.0]])
    values = jnp.array([[0.5, 0.1, 0.5]])
    mask = jnp.ones((1, 3))
    loss, stats = core.value_loss(values, old, ret, mask, 0.2)
    # clipped values: 0.2, 0.1, 0.2; per-token max of squared errors
    want = 0.5 * np.mean([max(0.25, 0.64), max(0.81, 0.81), max(2.25, 1.44)])
    assert float(loss) == pytest.approx(want, rel=1e-6)
    assert float(stats["vf_clipfrac"]) == pytest.approx(1 / 3)
    # Token 0: the clipped error is the larger and the clip saturates -> no gradient to V.
    g = jax.grad(lambda v: core.value_loss(v, old, ret, mask, 0.2)[0])(values)
    assert float(g[0, 0]) == 0.0
    assert float(g[0, 2]) == pytest.approx((0.5 - (-1.0)) / 3, rel=1e-6)


def test_kl_penalty_is_zero_when_policy_equals_reference_and_score_lands_on_last_token():
    logp = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -0.1, -9.0]])
    mask = jnp.asarray(_mask([3, 2], 3))
    rewards, kl = core.kl_penalty_rewards(logp, logp, jnp.array([2.0, -1.0]), mask, 0.3)
    np.testing.assert_array_equal(kl, 0.0)
    np.testing.assert_array_equal(rewards, [[0, 0, 2.0], [0, -1.0, 0]])
    ref = logp - 0.5
    rewards, kl = core.kl_penalty_rewards(logp, ref, jnp.zeros(2), mask, 0.3)
    np.testing.assert_allclose(kl, 0.5 * mask)
    np.testing.assert_allclose(rewards, -0.15 * mask)


def test_whiten_gives_zero_mean_unit_variance_on_masked_entries():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 5.0, size=(3, 6)).astype(np.float32)
    mask = _mask([6, 2, 4], 6)
    w = np.asarray(core.whiten(jnp.asarray(x), jnp.asarray(mask)))
    vals = w[mask > 0]
    raw = x[mask > 0]
    np.testing.assert_allclose(vals, (raw - raw.mean()) / raw.std(ddof=1), rtol=1e-4, atol=1e-5)
    assert np.all(w[mask == 0] == 0)


def test_adaptive_kl_controller_follows_ziegler_et_al():
    ctl = core.KLController(0.2, target=6.0, horizon=10000)
    # KL 9 -> error clip(9/6 - 1) = 0.2 -> beta * (1 + 0.2 * 256 / 10000)
    assert ctl.update(9.0, 256) == pytest.approx(0.2 * (1 + 0.2 * 256 / 10000))
    before = ctl.value
    # KL 5.4 -> error -0.1
    assert ctl.update(5.4, 100) == pytest.approx(before * (1 - 0.1 * 100 / 10000))
    fixed = core.KLController(0.2)
    assert fixed.update(100.0, 256) == 0.2


def test_explained_variance_and_entropy():
    mask = jnp.ones((2, 3))
    r = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 7.0]])
    assert float(core.explained_variance(r, r, mask)) == pytest.approx(1.0)
    assert float(core.explained_variance(jnp.zeros_like(r) + r.mean(), r, mask)) == pytest.approx(0.0, abs=1e-6)
    logits = jnp.zeros((2, 3, 10))
    assert float(core.entropy(logits, mask)) == pytest.approx(np.log(10), rel=1e-6)
