"""Tests for dpo_jax.losses: golden values against independent float64 numpy formulas, gradient
signs, numerical stability at saturated margins, padding/shuffle invariance, sharded == single
device, option validation and loss combinations."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dpo_jax import losses

ALL = losses.LOSS_NAMES
BETA = 0.1


# ----------------------------------------------------------------- independent numpy references
# Written from the papers' formulas (float64), without looking at dpo_jax.losses.core.


def np_logsig(x):
    return -np.logaddexp(0.0, -x)


def np_sig(x):
    return np.exp(np_logsig(x))


def np_f_score(r, opts, trl_form=False):
    """f-DPO score of a log-ratio r (Wang et al. 2023, "Beyond Reverse KL"): f'(u) at the density
    ratio u = e^r minus f'(1), for f of reverse KL (u log u), forward KL (-log u), Jensen-Shannon
    (u log u - (u + 1) log((u + 1)/2)) and the alpha-divergence in TRL's parametrisation
    (f'(u) = u^(alpha-1) / (alpha-1) + const). `trl_form`: without subtracting f'(1), as TRL."""
    kind = opts.get("f_divergence_type") or "reverse_kl"
    if kind == "reverse_kl":  # f'(u) = log u + 1: the log-ratio itself
        return np.asarray(r, np.float64)
    u = np.exp(np.asarray(r, np.float64))
    if kind == "forward_kl":
        f_prime, at_one = -1.0 / u, -1.0
    elif kind == "js_divergence":
        f_prime, at_one = np.log(2 * u / (1 + u)), 0.0
    elif kind == "alpha_divergence":
        a = opts.get("f_alpha_divergence_coef", 0.5)
        f_prime, at_one = u ** (a - 1) / (a - 1), 1.0 / (a - 1)
    else:
        raise KeyError(kind)
    if kind == "js_divergence" and trl_form:
        return f_prime - np.log(2.0)
    return f_prime if trl_form else f_prime - at_one


def np_reference(name, opts, pw, pl, rw, rl, lw, ll, mask, trl_form=False):
    """Per-pair loss for the real pairs (mask True) only; returns an array over real pairs."""
    pw, pl, rw, rl, lw, ll = (np.asarray(a, np.float64)[mask] for a in (pw, pl, rw, rl, lw, ll))
    b = opts.get("beta", BETA)
    eps = opts.get("label_smoothing") or 0.0
    def S(r):  # noqa: E306 - the score that replaces a log-ratio under an f-divergence
        return np_f_score(r, opts, trl_form)
    h = S(pw - rw) - S(pl - rl)
    if name == "sigmoid":
        if opts.get("reference_free"):
            h = S(pw) - S(pl)
        return -(1 - eps) * np_logsig(b * h) - eps * np_logsig(-b * h)
    if name == "sigmoid_norm":
        return -np_logsig(b * (S(pw - rw) / lw - S(pl - rl) / ll))
    if name == "dpop":
        lam = opts.get("dpop_lambda", 50.0)
        return -np_logsig(b * ((pw - rw) - (pl - rl) - lam * np.maximum(0.0, rw - pw)))
    if name == "hinge":
        return np.maximum(0.0, 1 - b * h)
    if name == "ipo":
        if opts.get("ipo_logps", "average") == "average":
            h = S(pw - rw) / lw - S(pl - rl) / ll
        return (h - 1 / (2 * b)) ** 2
    if name == "exo_pair":
        e = opts.get("label_smoothing") or 1e-3
        # KL((q, 1-q) || (1-e, e)) with q = sigma(beta h)
        return np_sig(b * h) * (np_logsig(b * h) - np.log(1 - e)) + np_sig(-b * h) * (
            np_logsig(-b * h) - np.log(e)
        )
    if name == "nca_pair":
        a, c = b * (pw - rw), b * (pl - rl)
        return -np_logsig(a) - 0.5 * np_logsig(-a) - 0.5 * np_logsig(-c)
    if name == "robust":
        return ((1 - eps) * -np_logsig(b * h) - eps * -np_logsig(-b * h)) / (1 - 2 * eps)
    if name == "bco_pair":
        a, c = b * (pw - rw), b * (pl - rl)
        d = np.concatenate([a, c]).mean()
        return -np_logsig(a - d) - np_logsig(d - c)
    if name == "sppo_hard":
        return (pw - rw - 0.5 / b) ** 2 + (pl - rl + 0.5 / b) ** 2
    if name in ("aot", "aot_unpaired"):
        if name == "aot":
            x, y = pw - pl, rw - rl
        else:
            x, y = pw - rw, pl - rl
        ix = np.argsort(x, kind="stable")
        d = x[ix] - np.sort(y)
        rank_loss = -(1 - eps) * np_logsig(b * d) - eps * np_logsig(-b * d)
        out = np.empty_like(x)
        out[ix] = rank_loss  # loss of rank k belongs to the pair whose x has rank k
        return out
    if name == "apo_zero":
        return 1 - np_sig(b * (pw - rw)) + np_sig(b * (pl - rl))
    if name == "apo_down":
        return np_sig(b * (pw - rw)) + 1 - np_sig(b * h)
    if name == "discopop":
        tau = opts.get("discopop_tau", 0.05)
        z = b * h
        mod = np_sig(z / tau)
        # exp(-z) * mod written in log space only to avoid numpy overflow warnings at z << 0
        return -np_logsig(z) * (1 - mod) + np.exp(-z + np_logsig(z / tau))
    if name == "sft":
        return -pw / lw
    if name == "simpo":
        g = opts.get("simpo_gamma", 0.5)
        return -np_logsig(b * pw / lw - b * pl / ll - g)
    if name == "orpo":
        aw, al = pw / lw, pl / ll
        odds_w = aw - np.log(-np.expm1(aw))
        odds_l = al - np.log(-np.expm1(al))
        return -aw - b * np_logsig(odds_w - odds_l)
    if name == "rpo":
        return -np_logsig(b * h) + opts.get("rpo_alpha", 1.0) * (-pw / lw)
    if name == "rdpo":
        return -np_logsig(b * h - opts["rdpo_alpha"] * (lw - ll))
    raise KeyError(name)


REQUIRED = {"rdpo": {"rdpo_alpha": 0.01}}


def make_cfg(name, **kw):
    cfg = losses.default_loss_config()
    cfg.name = name
    for n in name.split(","):
        for k, v in REQUIRED.get(n, {}).items():
            kw.setdefault(k, v)
    for k, v in kw.items():
        cfg[k] = v
    return losses.loss_config_from(cfg)


def make_inputs(seed, b=32, saturate=True, n_pad=0):
    """Random sums of log-probs; some pairs with |beta*h| ~ 100 when `saturate`."""
    rng = np.random.default_rng(seed)
    lw = rng.integers(1, 64, b).astype(np.float32)
    ll = rng.integers(1, 64, b).astype(np.float32)
    # per-token log-probs in [-3, -0.01] so ORPO's p stays < 1 in the golden comparisons
    pw = (-rng.uniform(0.01, 3.0, b) * lw).astype(np.float32)
    pl = (-rng.uniform(0.01, 3.0, b) * ll).astype(np.float32)
    rw = (pw + rng.normal(0, 3.0, b)).astype(np.float32)
    rl = (pl + rng.normal(0, 3.0, b)).astype(np.float32)
    if saturate:  # |beta * h| ~ 100: reference log-ratio pushed by +-1000 nats
        rw[:4] = pw[:4] + np.array([1000.0, -1000.0, 990.0, -990.0], np.float32)
    w = np.ones(b, np.float32)
    if n_pad:
        w[-n_pad:] = 0.0
        for a in (pw, pl, rw, rl):
            a[-n_pad:] = rng.normal(0, 1e3, n_pad)  # garbage
        lw[-n_pad:] = 0.0
        ll[-n_pad:] = 0.0
    return pw, pl, rw, rl, lw, ll, w


def stats(pw, pl, lw, ll):
    return losses.SequenceStats(*(jnp.asarray(a) for a in (pw, pl, lw, ll)))


def run(cfg, pw, pl, rw, rl, lw, ll, w=None):
    ref = stats(rw, rl, lw, ll)
    return losses.preference_loss(cfg, stats(pw, pl, lw, ll), ref, None if w is None else jnp.asarray(w))


# Losses whose papers make d loss / d pi_w < 0 and d loss / d pi_l > 0 everywhere (hinge: >= /
# <= where the margin is met). ipo / sppo_hard / exo_pair / nca_pair / discopop / apo_down are
# regressions towards a target or non-monotone, sft does not see the rejected response.
STRICT_SIGN = ("sigmoid", "robust", "bco_pair", "aot", "aot_unpaired", "apo_zero", "simpo", "orpo",
               "rpo", "rdpo", "sigmoid_norm", "dpop")


# ------------------------------------------------------------------------------- golden values

GOLDEN_CASES = [(n, {}) for n in ALL] + [
    ("sigmoid", {"label_smoothing": 0.2}),
    ("sigmoid", {"reference_free": True}),
    ("robust", {"label_smoothing": 0.2}),
    ("exo_pair", {"label_smoothing": 0.1}),
    ("aot", {"label_smoothing": 0.1}),
    ("aot_unpaired", {"label_smoothing": 0.1}),
    ("ipo", {"ipo_logps": "sum"}),
    ("ipo", {"beta": 0.5}),
    ("simpo", {"beta": 2.0, "simpo_gamma": 1.0}),
    ("rpo", {"rpo_alpha": 0.3}),
    ("rdpo", {"rdpo_alpha": 0.05}),
    ("discopop", {"discopop_tau": 0.5}),
    ("sigmoid_norm", {"beta": 5.0}),
    ("dpop", {"dpop_lambda": 5.0}),
    ("dpop", {"beta": 0.3, "dpop_lambda": 0.0}),
]


@pytest.mark.parametrize("name,opts", GOLDEN_CASES, ids=lambda x: str(x))
def test_golden_against_numpy(name, opts):
    cfg = make_cfg(name, **opts)
    pw, pl, rw, rl, lw, ll, w = make_inputs(0)
    out = run(cfg, pw, pl, rw, rl, lw, ll)
    expected = np_reference(name, {"beta": BETA, **REQUIRED.get(name, {}), **opts}, pw, pl, rw, rl, lw, ll, np.ones(len(pw), bool))
    got = np.asarray(out.losses, np.float64)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, expected, rtol=2e-4, atol=2e-5 * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("name", ALL)
def test_finite_loss_and_grad_at_saturated_margins(name):
    cfg = make_cfg(name)
    pw, pl, rw, rl, lw, ll, w = make_inputs(1, n_pad=3)
    # Saturate the policy side too: beta * h = +-100 from the policy log-ratio.
    pw[4:6] = pl[4:6] + np.array([1000.0, -1000.0], np.float32)

    def f(pw_, pl_):
        out = run(cfg, pw_, pl_, rw, rl, lw, ll, w)
        return losses.weighted_mean(out.losses, jnp.asarray(w)), out

    (val, out), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(jnp.asarray(pw), jnp.asarray(pl))
    assert np.isfinite(float(val))
    for a in (out.losses, out.chosen_rewards, out.rejected_rewards, *grads, *out.extras.values()):
        assert np.all(np.isfinite(np.asarray(a))), name


def test_orpo_log_odds_near_certainty_match_float64():
    """log(1 - p) as p -> 1 (average log-probs -1e-5 .. -0.5): ORPO's log odds equal float64
    numpy's to float32 precision. 1 - exp(x) computed directly loses the digits of 1 - p there,
    so only the expm1 branch of log1mexp passes this tolerance near 0."""
    cfg = make_cfg("orpo")
    lens = np.full(4, 10.0, np.float32)
    pw = np.array([-1e-4, -1e-3, -0.05, -5.0], np.float32)  # averages -1e-5 .. -0.5
    pl = np.array([-20.0, -1e-2, -30.0, -6.0], np.float32)
    out = losses.preference_loss(cfg, stats(pw, pl, lens, lens), None)
    aw, al = pw.astype(np.float64) / lens, pl.astype(np.float64) / lens
    want = (aw - np.log(-np.expm1(aw))) - (al - np.log(-np.expm1(al)))
    np.testing.assert_allclose(float(out.extras["log_odds_chosen"]), want.mean(), rtol=2e-6)


def test_orpo_saturated_probability_is_finite():
    """ORPO's log(1 - p) at p -> 1 (average log-prob 0 or -1e-9): loss and grads stay finite."""
    cfg = make_cfg("orpo")
    pw = jnp.array([0.0, -1e-9, -5.0, 0.0], jnp.float32)
    pl = jnp.array([-5.0, -1e-9, 0.0, 0.0], jnp.float32)
    lens = jnp.array([5.0, 1.0, 5.0, 3.0], jnp.float32)

    def f(pw_, pl_):
        return losses.preference_loss(cfg, losses.SequenceStats(pw_, pl_, lens, lens), None).losses.sum()

    val, grads = jax.value_and_grad(f, argnums=(0, 1))(pw, pl)
    assert np.isfinite(float(val))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


@pytest.mark.parametrize("name", STRICT_SIGN + ("hinge", "sft"))
def test_gradient_signs(name):
    cfg = make_cfg(name)
    pw, pl, rw, rl, lw, ll, _ = make_inputs(2, saturate=False)

    def f(pw_, pl_):
        return run(cfg, pw_, pl_, rw, rl, lw, ll).losses.sum()

    gw, gl = (np.asarray(g) for g in jax.grad(f, argnums=(0, 1))(jnp.asarray(pw), jnp.asarray(pl)))
    if name in STRICT_SIGN:
        assert np.all(gw < 0), (name, gw)
        assert np.all(gl > 0), (name, gl)
    else:  # hinge: zero where the margin is met; sft: rejected unseen
        assert np.all(gw <= 0) and np.all(gl >= 0)
        assert np.any(gw < 0)


def test_dpo_is_ln2_with_zero_rewards_when_policy_equals_reference():
    cfg = make_cfg("sigmoid")
    pw, pl, _, _, lw, ll, _ = make_inputs(3)
    out = run(cfg, pw, pl, pw, pl, lw, ll)
    np.testing.assert_allclose(np.asarray(out.losses), math.log(2.0), rtol=1e-6)
    assert np.all(np.asarray(out.chosen_rewards) == 0) and np.all(np.asarray(out.rejected_rewards) == 0)


def test_rewards_are_beta_log_ratios_and_stop_gradient():
    cfg = make_cfg("sigmoid", beta=0.3)
    pw, pl, rw, rl, lw, ll, _ = make_inputs(4)
    out = run(cfg, pw, pl, rw, rl, lw, ll)
    np.testing.assert_allclose(np.asarray(out.chosen_rewards), 0.3 * (pw - rw), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.rejected_rewards), 0.3 * (pl - rl), rtol=1e-5, atol=1e-4)
    g = jax.grad(lambda x: run(cfg, x, pl, rw, rl, lw, ll).chosen_rewards.sum())(jnp.asarray(pw))
    assert np.all(np.asarray(g) == 0)


# ------------------------------------------------------------------ batch statistics & padding


@pytest.mark.parametrize("name", ALL)
def test_shuffle_invariance(name):
    cfg = make_cfg(name)
    pw, pl, rw, rl, lw, ll, w = make_inputs(5, n_pad=4)
    out = run(cfg, pw, pl, rw, rl, lw, ll, w)
    perm = np.random.default_rng(0).permutation(len(pw))
    out_p = run(cfg, *(a[perm] for a in (pw, pl, rw, rl, lw, ll, w)))
    real = w[perm] > 0
    np.testing.assert_allclose(np.asarray(out_p.losses)[real], np.asarray(out.losses)[perm][real], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out_p.chosen_rewards), np.asarray(out.chosen_rewards)[perm], rtol=1e-6)
    for k in out.extras:
        np.testing.assert_allclose(float(out_p.extras[k]), float(out.extras[k]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ALL)
def test_padding_pairs_do_not_change_real_pairs(name):
    """Real pairs' losses equal those of the unpadded batch, and match numpy on real pairs only."""
    cfg = make_cfg(name)
    n_real, n_pad = 20, 12
    pw, pl, rw, rl, lw, ll, w = make_inputs(6, b=n_real + n_pad, n_pad=n_pad)
    out = run(cfg, pw, pl, rw, rl, lw, ll, w)
    out_real = run(cfg, *(a[:n_real] for a in (pw, pl, rw, rl, lw, ll)))
    got = np.asarray(out.losses)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got[:n_real], np.asarray(out_real.losses), rtol=1e-5, atol=1e-6)
    for k in out.extras:
        np.testing.assert_allclose(float(out.extras[k]), float(out_real.extras[k]), rtol=1e-5, atol=1e-6)
    expected = np_reference(name, {"beta": BETA, **REQUIRED.get(name, {})}, pw, pl, rw, rl, lw, ll, w > 0)
    np.testing.assert_allclose(got[:n_real], expected, rtol=2e-4, atol=2e-5 * max(1.0, np.abs(expected).max()))


def test_bco_delta_is_global_batch_mean():
    cfg = make_cfg("bco_pair")
    pw, pl, rw, rl, lw, ll, w = make_inputs(7, n_pad=5)
    out = run(cfg, pw, pl, rw, rl, lw, ll, w)
    m = w > 0
    expected = BETA * np.concatenate([(pw - rw)[m], (pl - rl)[m]]).astype(np.float64).mean()
    np.testing.assert_allclose(float(out.extras["bco_delta"]), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_sharded_jit_matches_single_device(name):
    devices = jax.devices()
    assert len(devices) == 8, "conftest should provide 8 CPU devices"
    mesh = Mesh(np.array(devices).reshape(8), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    cfg = make_cfg(name)
    pw, pl, rw, rl, lw, ll, w = make_inputs(8, b=64, n_pad=5)
    expected = run(cfg, pw, pl, rw, rl, lw, ll, w)

    @jax.jit
    def step(pol, ref, weights):
        out = losses.preference_loss(cfg, pol, ref, weights)
        return out, losses.weighted_mean(out.losses, weights)

    put = lambda a: jax.device_put(jnp.asarray(a), sharding)  # noqa: E731
    pol = losses.SequenceStats(put(pw), put(pl), put(lw), put(ll))
    ref = losses.SequenceStats(put(rw), put(rl), put(lw), put(ll))
    out, mean = step(pol, ref, put(w))
    assert len(out.losses.sharding.device_set) == 8
    for a, b in ((out.losses, expected.losses), (out.chosen_rewards, expected.chosen_rewards)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(mean), float(losses.weighted_mean(expected.losses, jnp.asarray(w))), rtol=1e-5)
    for k in expected.extras:
        np.testing.assert_allclose(float(out.extras[k]), float(expected.extras[k]), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ config and validation


def test_default_config_is_dpo_with_reference():
    cfg = losses.loss_config_from(losses.default_loss_config())
    assert cfg.names == ("sigmoid",) and cfg.beta == 0.1 and cfg.weights == (1.0,)
    assert losses.needs_reference(cfg)
    hash(cfg)  # usable as a static jit argument


@pytest.mark.parametrize(
    "name,opts,needs",
    [("simpo", {}, False), ("orpo", {}, False), ("sft", {}, False), ("sigmoid", {"reference_free": True}, False),
     ("sigmoid", {"reference_free": False}, True), ("ipo", {}, True), ("sft,simpo", {}, False),
     ("sft,sigmoid", {}, True)],
)
def test_needs_reference(name, opts, needs):
    assert losses.needs_reference(make_cfg(name, **opts)) is needs


def test_reference_free_losses_run_without_reference():
    pw, pl, _, _, lw, ll, _ = make_inputs(9)
    for name, opts in (("simpo", {}), ("orpo", {}), ("sft", {}), ("sigmoid", {"reference_free": True})):
        out = losses.preference_loss(make_cfg(name, **opts), stats(pw, pl, lw, ll), None)
        assert np.all(np.isfinite(np.asarray(out.losses)))
    with pytest.raises(ValueError, match="need reference"):
        losses.preference_loss(make_cfg("sigmoid"), stats(pw, pl, lw, ll), None)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="valid names:.*sigmoid.*rdpo"):
        make_cfg("dpo")
    with pytest.raises(ValueError, match="unknown loss name"):
        make_cfg("sigmoid,foo")


@pytest.mark.parametrize(
    "name,option,value,users",
    [("ipo", "label_smoothing", 0.1, "aot, aot_unpaired, exo_pair, robust, sigmoid"),
     ("sigmoid", "ipo_logps", "sum", "ipo"),
     ("sigmoid,sft", "simpo_gamma", 1.0, "simpo")],
)
def test_unused_option_is_an_error(name, option, value, users):
    with pytest.raises(ValueError, match=f"loss.{option}.*unused.*read only by: {users}"):
        make_cfg(name, **{option: value})


@pytest.mark.parametrize("option,value", [("reference_free", False), ("simpo_gamma", 0.5), ("rpo_alpha", 1.0),
                                          ("rdpo_alpha", 0.1), ("discopop_tau", 0.05), ("ipo_logps", "average"),
                                          ("dpop_lambda", 50.0), ("f_alpha_divergence_coef", 0.5)])
def test_every_optional_option_rejected_when_unused(option, value):
    with pytest.raises(ValueError, match=option):
        make_cfg("hinge", **{option: value})


def test_option_used_by_any_selected_loss_is_accepted():
    cfg = make_cfg("ipo,sigmoid", label_smoothing=0.1)
    assert cfg.label_smoothing == 0.1


@pytest.mark.parametrize(
    "kw,match",
    [({"beta": 0.0}, "beta must be > 0"), ({"beta": -1.0}, "beta must be > 0"), ({"beta": float("nan")}, "finite"),
     ({"label_smoothing": 0.5}, r"\[0, 0.5\)"), ({"label_smoothing": -0.1}, r"\[0, 0.5\)")],
)
def test_value_ranges(kw, match):
    with pytest.raises(ValueError, match=match):
        make_cfg("sigmoid", **kw)


def test_more_value_checks():
    with pytest.raises(ValueError, match="ipo_logps"):
        make_cfg("ipo", ipo_logps="mean")
    with pytest.raises(ValueError, match="exo_pair"):
        make_cfg("exo_pair", label_smoothing=0.0)
    with pytest.raises(ValueError, match="rdpo_alpha"):
        losses.loss_config_from({"name": "rdpo"})
    with pytest.raises(ValueError, match="discopop_tau must be > 0"):
        make_cfg("discopop", discopop_tau=0.0)
    with pytest.raises(ValueError, match="unknown loss option"):
        losses.loss_config_from({"name": "sigmoid", "betta": 0.1})
    with pytest.raises(ValueError, match="twice"):
        make_cfg("sigmoid,sigmoid")


def test_weights_validation():
    with pytest.raises(ValueError, match="2 entries but loss.name lists 1"):
        make_cfg("sigmoid", weights=(1.0, 0.5))
    with pytest.raises(ValueError, match="positive sum"):
        make_cfg("sigmoid,sft", weights=(0.0, 0.0))
    with pytest.raises(ValueError, match=">= 0"):
        make_cfg("sigmoid,sft", weights=(1.0, -0.5))


def test_default_config_fields_are_declared():
    # Every field of config.loss comes from a declaration with a one-line doc (the schema is
    # generated from them: losses/spec.py); docs/losses.md shows the docs.
    declared = {o.name: o for o in losses.spec.options()}
    assert set(losses.default_loss_config().keys()) == set(declared)
    for name, option in declared.items():
        assert option.doc and "\n" not in option.doc, name
        if name not in ("name", "beta"):
            assert losses.default_loss_config()[name] is None, name


# ---------------------------------------------------------------------------------- combinations


def test_combination_weights_and_extras():
    pw, pl, rw, rl, lw, ll, w = make_inputs(10, n_pad=2)
    combo = run(make_cfg("sigmoid,sft", weights=(1.0, 0.5)), pw, pl, rw, rl, lw, ll, w)
    dpo = run(make_cfg("sigmoid"), pw, pl, rw, rl, lw, ll, w)
    sft = run(make_cfg("sft"), pw, pl, rw, rl, lw, ll, w)
    np.testing.assert_allclose(np.asarray(combo.losses), np.asarray(dpo.losses + 0.5 * sft.losses), rtol=1e-6)
    # rewards come from the first non-sft component
    np.testing.assert_allclose(np.asarray(combo.chosen_rewards), np.asarray(dpo.chosen_rewards))
    m = w > 0
    np.testing.assert_allclose(float(combo.extras["loss/sft"]), np.mean(-pw[m] / lw[m]), rtol=1e-5)
    np.testing.assert_allclose(float(combo.extras["nll_loss"]), np.mean(-pw[m] / lw[m]), rtol=1e-5)
    # sft listed first: rewards still come from sigmoid
    combo2 = run(make_cfg("sft,sigmoid"), pw, pl, rw, rl, lw, ll, w)
    np.testing.assert_allclose(np.asarray(combo2.chosen_rewards), np.asarray(dpo.chosen_rewards))


def test_rpo_equals_sigmoid_plus_weighted_sft():
    pw, pl, rw, rl, lw, ll, _ = make_inputs(11)
    rpo = run(make_cfg("rpo", rpo_alpha=0.7), pw, pl, rw, rl, lw, ll)
    combo = run(make_cfg("sigmoid,sft", weights=(1.0, 0.7)), pw, pl, rw, rl, lw, ll)
    np.testing.assert_allclose(np.asarray(rpo.losses), np.asarray(combo.losses), rtol=1e-5)


def test_three_way_combination_with_list_names():
    pw, pl, rw, rl, lw, ll, _ = make_inputs(12)
    cfg = make_cfg("sigmoid,bco_pair,sft", weights=(0.8, 0.2, 1.0))
    cfg_list = losses.loss_config_from({"name": ["sigmoid", "bco_pair", "sft"], "weights": [0.8, 0.2, 1.0]})
    assert cfg == cfg_list
    out = run(cfg, pw, pl, rw, rl, lw, ll)
    parts = [run(make_cfg(n), pw, pl, rw, rl, lw, ll).losses for n in ("sigmoid", "bco_pair", "sft")]
    np.testing.assert_allclose(np.asarray(out.losses), np.asarray(0.8 * parts[0] + 0.2 * parts[1] + parts[2]), rtol=1e-5)
    assert set(out.extras) >= {"loss/sigmoid", "loss/bco_pair", "loss/sft", "bco_delta", "nll_loss"}


# ------------------------------------------------ f-divergences, sigmoid_norm, dpop (TRL 1.16 knobs)

F_TYPES = [("forward_kl", {}), ("js_divergence", {}), ("alpha_divergence", {}),
           ("alpha_divergence", {"f_alpha_divergence_coef": 2.0}),
           ("alpha_divergence", {"f_alpha_divergence_coef": -0.5})]
F_LOSSES = sorted(losses.F_DIVERGENCE_LOSSES)
# Losses whose value depends only on the difference of the two scores: there TRL's scores (the
# additive constant dropped) give the same loss; ipo and sigmoid_norm divide each score by its
# own length first, so the constant survives when |y_w| != |y_l|.
DIFFERENCE_ONLY = ("sigmoid", "hinge", "exo_pair", "robust", "discopop")


def make_ratio_inputs(seed, b=32, max_ratio=20.0):
    """Log-prob sums whose log-ratios c_w, c_l lie in [-max_ratio, max_ratio] (float64 numpy of
    e^{|r|} stays exact)."""
    pw, pl, _, _, lw, ll, w = make_inputs(seed, b=b, saturate=False)
    rng = np.random.default_rng(seed + 100)
    rw = (pw - rng.uniform(-max_ratio, max_ratio, b)).astype(np.float32)
    rl = (pl - rng.uniform(-max_ratio, max_ratio, b)).astype(np.float32)
    return pw, pl, rw, rl, lw, ll, w


@pytest.mark.parametrize("name", F_LOSSES)
@pytest.mark.parametrize("f_type,f_opts", F_TYPES, ids=lambda x: str(x))
def test_f_divergence_golden_against_numpy(name, f_type, f_opts):
    opts = {"f_divergence_type": f_type, **f_opts}
    if name == "sigmoid_norm":
        opts["beta"] = 2.0
    cfg = make_cfg(name, **opts)
    pw, pl, rw, rl, lw, ll, _ = make_ratio_inputs(20)
    got = np.asarray(run(cfg, pw, pl, rw, rl, lw, ll).losses, np.float64)
    mask = np.ones(len(pw), bool)
    expected = np_reference(name, {"beta": BETA, **opts}, pw, pl, rw, rl, lw, ll, mask)
    assert np.all(np.isfinite(got))
    tol = dict(rtol=5e-4, atol=2e-5 * max(1.0, np.abs(expected).max()))
    np.testing.assert_allclose(got, expected, **tol)
    if name in DIFFERENCE_ONLY:  # TRL 1.16's scores (constants dropped) give the same loss
        trl = np_reference(name, {"beta": BETA, **opts}, pw, pl, rw, rl, lw, ll, mask, trl_form=True)
        np.testing.assert_allclose(got, trl, **tol)


@pytest.mark.parametrize("name", F_LOSSES)
@pytest.mark.parametrize("f_type,f_opts", F_TYPES + [("alpha_divergence", {"f_alpha_divergence_coef": 1.001})],
                         ids=lambda x: str(x))
def test_f_divergence_float32_finite_up_to_100(name, f_type, f_opts):
    """Log-ratios up to |r| = 100 in float32 (TRL's forward_kl e^{-r} is inf there): loss and
    gradient finite, including beta = 10 and IPO's square."""
    cfg = make_cfg(name, f_divergence_type=f_type, beta=10.0 if name != "ipo" else 0.1, **f_opts)
    grid = np.array([-100.0, -88.8, -80.0, -30.0, -1e-3, 0.0, 1e-3, 30.0, 80.0, 88.8, 100.0], np.float32)
    c_w, c_l = (a.ravel() for a in np.meshgrid(grid, grid))
    n = len(c_w)
    lens = np.full(n, 3.0, np.float32)
    rw, rl = np.full(n, -50.0, np.float32), np.full(n, -60.0, np.float32)

    def f(pw_, pl_):
        out = run(cfg, pw_, pl_, rw, rl, lens, lens)
        return losses.weighted_mean(out.losses), out.losses

    (val, per_pair), grads = jax.value_and_grad(f, argnums=(0, 1), has_aux=True)(
        jnp.asarray(rw + c_w), jnp.asarray(rl + c_l))
    assert np.isfinite(float(val)), name
    for a in (per_pair, *grads):
        assert np.all(np.isfinite(np.asarray(a))), (name, f_type)


NEW_OBJECTIVES = [("sigmoid_norm", {"beta": 2.0}), ("dpop", {}), ("dpop", {"dpop_lambda": 5.0})] + [
    (n, {"f_divergence_type": t, **o}) for n in F_LOSSES for t, o in F_TYPES[:3]]


@pytest.mark.parametrize("name,opts", NEW_OBJECTIVES, ids=lambda x: str(x))
def test_new_objectives_gradients_against_numpy(name, opts):
    """jax.grad of the float32 loss against float64 central differences of the numpy formula."""
    cfg = make_cfg(name, **opts)
    pw, pl, rw, rl, lw, ll, _ = make_ratio_inputs(21, b=8, max_ratio=4.0)
    if name == "dpop":  # both sides of the kink ref_w = pi_w, away from it
        rw[:4] = pw[:4] + np.array([2.0, 0.5, -0.5, -2.0], np.float32)
    full = {"beta": BETA, **opts}
    mask = np.ones(len(pw), bool)

    def total(a_w, a_l):
        return np_reference(name, full, a_w, a_l, rw, rl, lw, ll, mask).sum()

    step = 1e-4
    expected = []
    for which in (0, 1):
        g = np.zeros(len(pw))
        for i in range(len(pw)):
            args = [np.asarray(pw, np.float64), np.asarray(pl, np.float64)]
            up, down = [a.copy() for a in args], [a.copy() for a in args]
            up[which][i] += step
            down[which][i] -= step
            g[i] = (total(*up) - total(*down)) / (2 * step)
        expected.append(g)
    grads = jax.grad(lambda a, b: run(cfg, a, b, rw, rl, lw, ll).losses.sum(), argnums=(0, 1))(
        jnp.asarray(pw), jnp.asarray(pl))
    for got, exp in zip(grads, expected):
        np.testing.assert_allclose(np.asarray(got, np.float64), exp, rtol=2e-3,
                                   atol=2e-4 * max(1.0, np.abs(exp).max()))


def test_dpop_penalty_only_below_the_reference():
    """DPOP equals DPO while pi_w >= ref_w; below, the chosen gradient is larger by
    beta * lambda * sigma(-z) and the dpop_penalty extra is the mean shortfall."""
    pw, pl, rw, rl, lw, ll, _ = make_ratio_inputs(22, b=16, max_ratio=3.0)
    rw[:8] = pw[:8] - 1.0  # chosen above the reference: no penalty
    rw[8:] = pw[8:] + 2.0  # 2 nats below
    dpop = run(make_cfg("dpop", dpop_lambda=50.0), pw, pl, rw, rl, lw, ll)
    dpo = run(make_cfg("sigmoid"), pw, pl, rw, rl, lw, ll)
    np.testing.assert_allclose(np.asarray(dpop.losses)[:8], np.asarray(dpo.losses)[:8], rtol=1e-6)
    assert np.all(np.asarray(dpop.losses)[8:] > np.asarray(dpo.losses)[8:])
    np.testing.assert_allclose(float(dpop.extras["dpop_penalty"]), 1.0, rtol=1e-5)  # 8 x 2 / 16
    g = jax.grad(lambda a: run(make_cfg("dpop"), a, pl, rw, rl, lw, ll).losses.sum())(jnp.asarray(pw))
    g_dpo = jax.grad(lambda a: run(make_cfg("sigmoid"), a, pl, rw, rl, lw, ll).losses.sum())(jnp.asarray(pw))
    assert np.all(np.asarray(g)[8:] < np.asarray(g_dpo)[8:] * 10)


def test_sigmoid_norm_with_equal_lengths_is_dpo_at_beta_over_length():
    pw, pl, rw, rl, lw, _, _ = make_ratio_inputs(23)
    lens = np.full(len(pw), 7.0, np.float32)
    norm = run(make_cfg("sigmoid_norm", beta=2.0), pw, pl, rw, rl, lens, lens)
    dpo = run(make_cfg("sigmoid", beta=2.0 / 7.0), pw, pl, rw, rl, lens, lens)
    np.testing.assert_allclose(np.asarray(norm.losses), np.asarray(dpo.losses), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(norm.chosen_rewards), 2.0 * (pw - rw) / 7.0, rtol=1e-4, atol=1e-5)


def test_f_divergence_scores_vanish_at_the_reference_and_alpha_one_is_reverse_kl():
    pw, pl, _, _, lw, ll, _ = make_ratio_inputs(24)
    for t, o in F_TYPES:
        out = run(make_cfg("sigmoid", f_divergence_type=t, **o), pw, pl, pw, pl, lw, ll)
        np.testing.assert_allclose(np.asarray(out.losses), math.log(2.0), rtol=1e-6)
    pw, pl, rw, rl, lw, ll, _ = make_ratio_inputs(25)
    one = run(make_cfg("ipo", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0),
              pw, pl, rw, rl, lw, ll)
    rkl = run(make_cfg("ipo"), pw, pl, rw, rl, lw, ll)
    np.testing.assert_allclose(np.asarray(one.losses), np.asarray(rkl.losses), rtol=1e-6)


@pytest.mark.parametrize("name", ["apo_zero", "sigmoid,sft", "dpop", "simpo", "bco_pair"])
def test_f_divergence_refused_for_other_losses(name):
    refused = [n for n in name.split(",") if n not in losses.F_DIVERGENCE_LOSSES]
    with pytest.raises(ValueError, match=f"f_divergence_type.*{refused[0]}"):
        make_cfg(name, f_divergence_type="js_divergence")


def test_f_divergence_option_values():
    assert make_cfg("sigmoid").f_divergence_type == "reverse_kl"
    cfg = make_cfg("hinge", f_divergence_type="alpha_divergence")
    assert cfg.f_alpha_divergence_coef == 0.5
    with pytest.raises(ValueError, match="expected one of reverse_kl, forward_kl"):
        make_cfg("sigmoid", f_divergence_type="kl")
    with pytest.raises(ValueError, match="f_alpha_divergence_coef.*alpha_divergence"):
        make_cfg("sigmoid", f_divergence_type="forward_kl", f_alpha_divergence_coef=0.3)
    with pytest.raises(ValueError, match="finite"):
        make_cfg("sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=float("inf"))
    with pytest.raises(ValueError, match="dpop_lambda must be >= 0"):
        make_cfg("dpop", dpop_lambda=-1.0)
