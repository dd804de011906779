"""KTO (Ethayarajh et al. 2024) against an independent numpy implementation of the paper's loss
with TRL's reference point: z0 = max(0, batch mean of the mismatched completions' log-ratios),
under stop_gradient; padding examples left out; the same on an 8-device mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpo_jax import losses


def np_kto(pi, ref, pi_kl, ref_kl, label, w, beta, dw, uw):
    """Eq. 7-8 of the KTO paper, float64, real examples (w > 0) only."""
    m = w > 0
    f = lambda a: np.asarray(a, np.float64)[m]
    z0 = max(0.0, float(np.mean(f(pi_kl) - f(ref_kl))))
    c = f(pi) - f(ref)
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))
    good = np.asarray(label)[m] > 0
    loss = np.where(good, dw * (1 - sig(beta * (c - z0))), uw * (1 - sig(beta * (z0 - c))))
    return loss, z0


def inputs(seed, B=16, n_pad=3, kl_shift=0.0):
    rng = np.random.default_rng(seed)
    pi, ref, pi_kl, ref_kl = (rng.normal(-40, 10, B).astype(np.float32) for _ in range(4))
    pi_kl = (pi_kl + kl_shift).astype(np.float32)
    label = (rng.random(B) < 0.6).astype(np.float32)
    w = np.ones(B, np.float32)
    w[B - n_pad:] = 0
    return pi, ref, pi_kl, ref_kl, label, w


def stats(a, b):
    lens = jnp.full(np.shape(a), 10.0)
    return losses.SequenceStats(jnp.asarray(a), jnp.asarray(b), lens, lens)


def kto_cfg(**opts):
    return losses.loss_config_from({"name": "kto", "beta": 0.1, **opts})


@pytest.mark.parametrize("opts,shift", [({}, 0.0), ({}, 15.0), ({"beta": 0.5}, 5.0),
                                        ({"desirable_weight": 1.33,
                                          "undesirable_weight": 0.7}, 8.0)])
def test_golden_against_numpy(opts, shift):
    pi, ref, pi_kl, ref_kl, label, w = inputs(0, kl_shift=shift)
    cfg = kto_cfg(**opts)
    out = losses.kto_loss(cfg, stats(pi, pi_kl), stats(ref, ref_kl), jnp.asarray(label),
                          jnp.asarray(w))
    want, z0 = np_kto(pi, ref, pi_kl, ref_kl, label, w, cfg.beta, cfg.desirable_weight,
                      cfg.undesirable_weight)
    np.testing.assert_allclose(np.asarray(out.losses)[w > 0], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(out.extras["kl"]), z0, rtol=1e-5, atol=1e-5)
    if shift == 15.0:
        assert z0 > 0
    r = cfg.beta * (pi.astype(np.float64) - ref)
    real = w > 0
    np.testing.assert_allclose(float(out.extras["rewards/chosen"]),
                               r[real & (label > 0)].mean(), rtol=1e-4)
    np.testing.assert_allclose(float(out.extras["rewards/rejected"]),
                               r[real & (label == 0)].mean(), rtol=1e-4)


def test_reference_point_is_clamped_at_zero():
    pi, ref, pi_kl, ref_kl, label, w = inputs(1, kl_shift=-100.0)
    out = losses.kto_loss(kto_cfg(), stats(pi, pi_kl), stats(ref, ref_kl), label, w)
    assert float(out.extras["kl"]) == 0.0
    want, _ = np_kto(pi, ref, pi_kl, ref_kl, label, w, 0.1, 1.0, 1.0)
    np.testing.assert_allclose(np.asarray(out.losses)[w > 0], want, rtol=1e-5, atol=1e-6)


def test_gradients_and_stop_gradient_on_z0():
    pi, ref, pi_kl, ref_kl, label, w = inputs(2, kl_shift=10.0)
    cfg = kto_cfg(beta=0.3)

    def f(a, akl):
        out = losses.kto_loss(cfg, stats(a, akl), stats(ref, ref_kl), label, w)
        return losses.weighted_mean(out.losses, jnp.asarray(w))

    g, g_kl = jax.grad(f, argnums=(0, 1))(jnp.asarray(pi), jnp.asarray(pi_kl))
    assert np.all(np.asarray(g_kl) == 0)  # z0 carries no gradient
    # d/dc of the numpy loss, by central differences in float64
    eps = 1e-4
    num = np.zeros(len(pi))
    for i in range(len(pi)):
        up, down = pi.astype(np.float64).copy(), pi.astype(np.float64).copy()
        up[i] += eps
        down[i] -= eps
        lu, _ = np_kto(up, ref, pi_kl, ref_kl, label, w, 0.3, 1.0, 1.0)
        ld, _ = np_kto(down, ref, pi_kl, ref_kl, label, w, 0.3, 1.0, 1.0)
        num[i] = (lu.sum() - ld.sum()) / (2 * eps) / w.sum()
    np.testing.assert_allclose(np.asarray(g), num, rtol=1e-3, atol=1e-7)
    good = (label > 0) & (w > 0)
    bad = (label == 0) & (w > 0)
    assert np.all(np.asarray(g)[good] < 0) and np.all(np.asarray(g)[bad] > 0)
    assert np.all(np.asarray(g)[w == 0] == 0)


def test_saturated_log_ratios_are_finite():
    pi, ref, pi_kl, ref_kl, label, w = inputs(3)
    pi[:4] = ref[:4] + np.array([1e4, -1e4, 1e4, -1e4], np.float32)
    pi_kl[0] = ref_kl[0] + 1e6

    def f(a):
        out = losses.kto_loss(kto_cfg(), stats(a, pi_kl), stats(ref, ref_kl), label, w)
        return losses.weighted_mean(out.losses, jnp.asarray(w)), out

    (val, out), g = jax.value_and_grad(f, has_aux=True)(jnp.asarray(pi))
    assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(g)))
    assert all(np.all(np.isfinite(np.asarray(v))) for v in out.extras.values())


def test_kto_refuses_pairs_and_combinations():
    with pytest.raises(ValueError, match="alone"):
        losses.loss_config_from({"name": "kto,sigmoid"})
    with pytest.raises(ValueError, match="unused"):
        losses.loss_config_from({"name": "sigmoid", "desirable_weight": 2.0})
    with pytest.raises(ValueError, match="unpaired"):
        losses.preference_loss(kto_cfg(), stats([1.0], [2.0]), stats([1.0], [2.0]))
    assert losses.uses_batch_statistics(kto_cfg())


def test_sharded_jit_matches_single_device():
    mesh = Mesh(np.array(jax.devices()).reshape(8), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    pi, ref, pi_kl, ref_kl, label, w = inputs(4, B=64, n_pad=5, kl_shift=6.0)
    cfg = kto_cfg()
    want = losses.kto_loss(cfg, stats(pi, pi_kl), stats(ref, ref_kl), label, w)
    put = lambda a: jax.device_put(jnp.asarray(a), sharding)

    @jax.jit
    def f(a, b, c, d, lab, wt):
        return losses.kto_loss(cfg, stats(a, b), stats(c, d), lab, wt)

    got = f(*(put(a) for a in (pi, pi_kl, ref, ref_kl, label, w)))
    np.testing.assert_allclose(np.asarray(got.losses), np.asarray(want.losses), rtol=1e-6)
    np.testing.assert_allclose(float(got.extras["kl"]), float(want.extras["kl"]), rtol=1e-6)
