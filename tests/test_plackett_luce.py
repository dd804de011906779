"""Plackett-Luce DPO (Rafailov et al. 2023, Appendix A.3) against an independent float64 numpy
implementation of the formula: values, masked slots, ties, top-k, saturated rewards, gradients,
metrics, the K = 2 case (DPO's sigmoid, bit for bit) and an 8-device mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpo_jax import losses

# ------------------------------------------------------------ independent float64 reference


def np_pl(c_BK, mask_BK, beta, top_k=None, ranks_BK=None):
    """Eq. A.3 per prompt: -sum over stages i of [r_i - log sum_{j in R_i} exp(r_j)], R_i the
    real responses ranked no better than i (i included; Breslow for ties), stage i counted when
    its rank < top_k. Also returns d loss / d c."""
    c_BK = np.asarray(c_BK, np.float64)
    B, K = c_BK.shape
    ranks = np.tile(np.arange(K), (B, 1)) if ranks_BK is None else np.asarray(ranks_BK)
    loss, grad = np.zeros(B), np.zeros((B, K))
    for b in range(B):
        real = [k for k in range(K) if mask_BK[b, k] > 0]
        r = beta * c_BK[b]
        for i in real:
            if top_k is not None and ranks[b, i] >= top_k:
                continue
            risk = [j for j in real if ranks[b, j] >= ranks[b, i]]
            lse = np.logaddexp.reduce(r[risk])
            loss[b] -= r[i] - lse
            p = np.exp(r[risk] - lse)
            grad[b, risk] += beta * p
            grad[b, i] -= beta
    return loss, grad


def inputs(seed, B=6, K=4, scale=5.0):
    rng = np.random.default_rng(seed)
    c = rng.normal(0, scale, (B, K)).astype(np.float32)
    mask = np.ones((B, K), np.float32)
    mask[1, 3:] = 0  # a prompt with 3 responses
    mask[2, 2:] = 0  # 2 responses
    mask[3, 1:] = 0  # 1 response: no stage
    return c, mask


def pl_cfg(**opts):
    return losses.loss_config_from({"name": "plackett_luce", "beta": 0.1, **opts})


# ------------------------------------------------------------------------------- the values


@pytest.mark.parametrize("beta,top_k", [(0.1, None), (0.5, None), (0.1, 2), (1.0, 1)])
def test_golden_against_numpy(beta, top_k):
    c, mask = inputs(0)
    got = np.asarray(losses.plackett_luce(jnp.asarray(c), jnp.asarray(mask), beta, top_k))
    want, _ = np_pl(c, mask, beta, top_k)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
    assert got[3] == 0.0


def test_gradients_against_numpy():
    c, mask = inputs(1)
    grad = jax.grad(lambda x: losses.plackett_luce(x, jnp.asarray(mask), 0.3).sum())(
        jnp.asarray(c))
    _, want = np_pl(c, mask, 0.3)
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(grad)[mask == 0] == 0)


def test_ties_follow_breslow_and_reduce_to_eq_a3_without_ties():
    c, mask = inputs(2)
    mask[:] = 1
    ranks = np.array([[0, 1, 1, 3], [0, 0, 2, 3], [0, 1, 2, 2], [0, 0, 0, 0],
                      [0, 1, 2, 3], [0, 1, 1, 1]])
    got = np.asarray(losses.plackett_luce(jnp.asarray(c), jnp.asarray(mask), 0.2,
                                          ranks_BK=jnp.asarray(ranks)))
    want, want_grad = np_pl(c, mask, 0.2, ranks_BK=ranks)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
    grad = jax.grad(lambda x: losses.plackett_luce(x, jnp.asarray(mask), 0.2,
                                                   ranks_BK=jnp.asarray(ranks)).sum())(
        jnp.asarray(c))
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-6)
    # Row 4 has no ties: the explicit ranks give the slot-order loss.
    plain = np.asarray(losses.plackett_luce(jnp.asarray(c), jnp.asarray(mask), 0.2))
    assert got[4] == plain[4]


def test_masked_slots_equal_the_shorter_list_alone():
    c, mask = inputs(3)
    padded = np.asarray(losses.plackett_luce(jnp.asarray(c), jnp.asarray(mask), 0.1))
    for b in range(len(c)):
        k = int(mask[b].sum())
        alone = losses.plackett_luce(jnp.asarray(c[b:b + 1, :k]), jnp.ones((1, k)), 0.1)
        np.testing.assert_allclose(padded[b], float(alone[0]), rtol=1e-6)
    # Garbage in masked slots changes nothing.
    c2 = np.where(mask > 0, c, 1e30).astype(np.float32)
    np.testing.assert_array_equal(
        np.asarray(losses.plackett_luce(jnp.asarray(c2), jnp.asarray(mask), 0.1)), padded)


def test_saturated_rewards_are_finite_and_match_numpy():
    c, mask = inputs(4, scale=1.0)
    c[0] = [1000.0, -1000.0, 3.0, -3.0]  # beta * c = +-100: sigma saturates in float32
    c[4] = [-2000.0, 2000.0, 0.0, 1e4]
    c[5] = 0.0
    def f(x):
        return losses.plackett_luce(x, jnp.asarray(mask), 0.1)
    got = np.asarray(f(jnp.asarray(c)))
    grad = np.asarray(jax.grad(lambda x: f(x).sum())(jnp.asarray(c)))
    want, want_grad = np_pl(c, mask, 0.1)
    assert np.all(np.isfinite(got)) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[5], sum(np.log(k) for k in (4, 3, 2)), rtol=1e-6)


def test_k2_is_sigmoid_bit_for_bit():
    rng = np.random.default_rng(5)
    pw, pl, rw, rl = (rng.normal(-50, 20, 16).astype(np.float32) for _ in range(4))
    pw[:3] = pl[:3] + np.array([1e4, -1e4, 0.0], np.float32)
    lens = np.full(16, 10.0, np.float32)
    stats = lambda a, b: losses.SequenceStats(jnp.asarray(a), jnp.asarray(b),
                                              jnp.asarray(lens), jnp.asarray(lens))
    for beta in (0.1, 0.37, 2.0):
        sig = losses.preference_loss(losses.loss_config_from({"name": "sigmoid", "beta": beta}),
                                     stats(pw, pl), stats(rw, rl))
        pl_pair = losses.preference_loss(pl_cfg(beta=beta), stats(pw, pl), stats(rw, rl))
        listed = losses.listwise_loss(pl_cfg(beta=beta), jnp.stack([pw, pl], 1),
                                      jnp.stack([rw, rl], 1), jnp.ones((16, 2)))
        np.testing.assert_array_equal(np.asarray(pl_pair.losses), np.asarray(sig.losses))
        np.testing.assert_array_equal(np.asarray(listed.losses), np.asarray(sig.losses))
        np.testing.assert_array_equal(np.asarray(listed.chosen_rewards),
                                      np.asarray(sig.chosen_rewards))
        np.testing.assert_array_equal(np.asarray(listed.rejected_rewards),
                                      np.asarray(sig.rejected_rewards))
        g_sig, g_pl = (jax.grad(lambda a, cfg=cfg: losses.preference_loss(
            cfg, stats(a, pl), stats(rw, rl)).losses.sum())(jnp.asarray(pw))
            for cfg in (losses.loss_config_from({"name": "sigmoid", "beta": beta}),
                        pl_cfg(beta=beta)))
        np.testing.assert_array_equal(np.asarray(g_pl), np.asarray(g_sig))


# ------------------------------------------------------------------------------- metrics


def test_metrics_adjacent_accuracy_and_rank_means():
    c, mask = inputs(6)
    ref = np.random.default_rng(7).normal(0, 1, c.shape).astype(np.float32)
    w = np.array([1, 1, 1, 1, 0, 1], np.float32)
    out = losses.listwise_loss(pl_cfg(beta=0.5), jnp.asarray(c + ref), jnp.asarray(ref),
                               jnp.asarray(mask), weights=jnp.asarray(w))
    r = 0.5 * c.astype(np.float64)
    acc = []
    for b in range(len(c)):
        k = int(mask[b].sum())
        pairs = [(r[b, i] > r[b, i + 1]) for i in range(k - 1)]
        acc.append(np.mean(pairs) if pairs else 0.0)
    np.testing.assert_allclose(float(out.extras["rewards/accuracies"]),
                               np.sum(w * acc) / w.sum(), rtol=1e-6)
    for k in range(4):
        sel = (mask[:, k] > 0) & (w > 0)
        np.testing.assert_allclose(float(out.extras[f"rewards/rank_{k}"]), r[sel, k].mean(),
                                   rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.rejected_rewards),
                               [r[b, int(mask[b].sum()) - 1] for b in range(len(c))],
                               rtol=1e-4, atol=1e-5)


def test_config_validation():
    with pytest.raises(ValueError, match="pl_top_k"):
        pl_cfg(pl_top_k=0)
    with pytest.raises(ValueError, match="unused"):
        losses.loss_config_from({"name": "sigmoid", "pl_top_k": 2})
    with pytest.raises(ValueError, match="alone"):
        losses.loss_config_from({"name": "plackett_luce,sft"})
    assert losses.needs_reference(pl_cfg())


def test_sharded_jit_matches_single_device():
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    rng = np.random.default_rng(8)
    c = rng.normal(0, 4, (32, 4)).astype(np.float32)
    ref = rng.normal(0, 4, (32, 4)).astype(np.float32)
    mask = (rng.random((32, 4)) < 0.8).astype(np.float32)
    mask[:, :2] = 1
    w = (rng.random(32) < 0.9).astype(np.float32)
    cfg = pl_cfg()
    want = losses.listwise_loss(cfg, c, ref, mask, weights=w)
    put = lambda a: jax.device_put(jnp.asarray(a), sharding)
    got = jax.jit(lambda *a: losses.listwise_loss(cfg, *a[:3], weights=a[3]))(
        put(c), put(ref), put(mask), put(w))
    np.testing.assert_allclose(np.asarray(got.losses), np.asarray(want.losses), rtol=1e-6)
    for k in want.extras:
        np.testing.assert_allclose(float(got.extras[k]), float(want.extras[k]), rtol=1e-6)
