"""Every metric the train / eval step logs for every loss, against float64 numpy written here.

The logged value of a metric is ``step._weighted_sums(policy, out, pair_weight)[k] /
sum(pair_weight)``: exactly what ``make_train_step`` reports, and ``make_eval_step``'s
(numerator, denominator) pair (``step.pair_metrics``: these sums over ``sum(pair_weight)``)
divided once by ``dpo_jax.eval_metrics``. The goldens below read only the inputs and the papers' / TRL's definitions
(``docs/losses.md``), never ``dpo_jax.losses``:

* pairs (every name in ``LOSS_NAMES``, options, combinations, WPO): ``loss``,
  ``rewards/chosen|rejected|margins|accuracies``, ``logps/chosen|rejected`` and the extras
  (``nll_loss``, ``log_odds_chosen``, ``log_odds_ratio``, ``dpop_penalty``, ``bco_delta``,
  ``loss/<name>``, ``wpo_weight``);
* ranked lists (``plackett_luce``): the same names, ``rewards/rank_<k>`` and the ranked-pair
  accuracy, on lists shorter than K and with tied responses;
* unpaired examples (``kto``): the same names, ``kl`` and ``count/desirable`` with z0 != 0.

Inputs exercise what a wrong metric would get wrong: reward ties (strict ``>``: a tie is not
a correct order, TRL's convention), ties of per-token averages only, non-unit pair weights,
padding pairs (weight 0) holding large garbage, zero padding lengths, lists with masked slots,
completions between 0 and z0 and exactly at z0.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import losses
from dpo_jax.step import _weighted_sums
from tests.test_kto import np_kto
from tests.test_losses import np_logsig, np_reference
from tests.test_plackett_luce import np_pl

BETA = 0.1


def logged(policy, out, w) -> dict[str, float]:
    """The step's logged means: weighted sums over the total pair weight."""
    sums = _weighted_sums(policy, out, jnp.asarray(w, jnp.float32))
    total = float(np.sum(w))
    return {k: float(v) / total for k, v in sums.items()}


def wmean(x, w):
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    return float(np.sum(w * x) / np.sum(w))


def assert_metrics(got: dict, want: dict, rtol=2e-5, atol=2e-6):
    assert set(got) == set(want), (sorted(set(got) ^ set(want)))
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, rtol=rtol, atol=atol, err_msg=k)


# ----------------------------------------------------------------------------------- pairs


def pair_inputs():
    """12 pairs (float32, every value exact in binary): pair 0 ties in summed AND averaged
    log-ratios and log-probs (equal lengths); pair 1 ties only per token (c_w / |y_w| = c_l /
    |y_l|, pi_w / |y_w| = pi_l / |y_l|, c_w > c_l); pair 2 is ordered the wrong way; weights
    0.5 and 2 on two pairs; the last 3 pairs are padding (weight 0, garbage +-1e3, length 0)."""
    pw = np.array([-6, -4, -9, -5, -12, -7.5, -20, -3, -10], np.float64)
    pl = np.array([-6, -8, -3, -11, -10, -9, -14, -6.5, -18], np.float64)
    rw = np.array([-5, -2, -6, -6, -11.5, -9, -19, -4, -12], np.float64)
    rl = np.array([-5, -4, -7, -10, -13, -8, -16, -6, -15], np.float64)
    lw = np.array([3, 2, 5, 4, 8, 6, 10, 2, 7], np.float64)
    ll = np.array([3, 4, 2, 6, 5, 4, 9, 3, 12], np.float64)
    w = np.array([1, 1, 1, 0.5, 1, 2, 1, 1, 1], np.float64)
    rng = np.random.default_rng(3)
    garbage = [rng.normal(0, 1e3, 3).round() for _ in range(4)]
    pw, pl, rw, rl = (np.concatenate([a, g]) for a, g in zip((pw, pl, rw, rl), garbage))
    lw, ll = np.concatenate([lw, np.zeros(3)]), np.concatenate([ll, np.zeros(3)])
    w = np.concatenate([w, np.zeros(3)])
    # WPO: the policy's per-token mean aligned log-probs (no reference); padding's stay below
    # ~log(vocabulary) as a real forward's do (exp of +-1e3 would overflow to inf * 0 = NaN)
    wpo_w = np.concatenate([-rng.uniform(0.1, 2.0, 9), [4.0, -3.0, 5.0]])
    wpo_l = np.concatenate([-rng.uniform(0.1, 2.0, 9), [3.0, 4.5, -6.0]])
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return tuple(map(f32, (pw, pl, rw, rl, lw, ll, w, wpo_w, wpo_l)))


def np_pair_rewards(name, opts, pw, pl, rw, rl, lw, ll):
    """(chosen, rejected) implicit rewards as the papers / TRL define them, float64."""
    b = opts.get("beta", BETA)
    avg_lw, avg_ll = np.maximum(lw, 1), np.maximum(ll, 1)
    if name == "sft":  # no implicit reward: the per-token average log-probs
        return pw / avg_lw, pl / avg_ll
    if name in ("simpo", "orpo"):  # SimPO Eq. 4; TRL ORPOTrainer
        return b * pw / avg_lw, b * pl / avg_ll
    if name == "sigmoid" and opts.get("reference_free"):
        return b * pw, b * pl
    if name == "sigmoid_norm" or (name == "ipo" and opts.get("ipo_logps", "average") == "average"):
        return b * (pw - rw) / avg_lw, b * (pl - rl) / avg_ll
    return b * (pw - rw), b * (pl - rl)


def np_pair_loss(name, opts, pw, pl, rw, rl, lw, ll, w):
    """Per-pair loss over the real pairs; bco_pair's delta is the pair-WEIGHTED mean."""
    m = w > 0
    if name == "plackett_luce":  # K = 2: DPO
        return np_reference("sigmoid", opts, pw, pl, rw, rl, lw, ll, m)
    if name == "bco_pair":
        b = opts.get("beta", BETA)
        a, c = b * (pw - rw)[m], b * (pl - rl)[m]
        d = np.sum(w[m] * (a + c)) / (2 * np.sum(w[m]))
        return -np_logsig(a - d) - np_logsig(d - c)
    return np_reference(name, opts, pw, pl, rw, rl, lw, ll, m)


def np_pair_extras(name, opts, pw, pl, rw, rl, lw, ll, w):
    m = w > 0
    f = lambda a: np.asarray(a, np.float64)[m]  # noqa: E731
    pw, pl, rw, rl, lw, ll, w = map(f, (pw, pl, rw, rl, lw, ll, w))
    b = opts.get("beta", BETA)
    if name in ("sft", "rpo"):
        return {"nll_loss": wmean(-pw / lw, w)}
    if name == "orpo":
        aw, al = pw / lw, pl / ll
        log_odds = (aw - np.log1p(-np.exp(aw))) - (al - np.log1p(-np.exp(al)))
        return {"nll_loss": wmean(-aw, w), "log_odds_chosen": wmean(log_odds, w),
                "log_odds_ratio": wmean(np_logsig(log_odds), w)}
    if name == "dpop":
        return {"dpop_penalty": wmean(np.maximum(0.0, rw - pw), w)}
    if name == "bco_pair":
        return {"bco_delta": np.sum(w * b * ((pw - rw) + (pl - rl))) / (2 * np.sum(w))}
    return {}


def golden_pair_metrics(names, weights, opts, inp, wpo=False):
    """Every metric the step logs for the loss list ``names`` (numpy only)."""
    pw, pl, rw, rl, lw, ll, w, wpo_w, wpo_l = (np.asarray(a, np.float64) for a in inp)
    m = w > 0
    total = np.zeros(m.sum())
    want = {}
    for name, cw in zip(names, weights):
        part = np_pair_loss(name, opts, pw, pl, rw, rl, lw, ll, w)
        total = total + cw * part
        want.update(np_pair_extras(name, opts, pw, pl, rw, rl, lw, ll, w))
        if len(names) > 1:
            want[f"loss/{name}"] = wmean(part, w[m])
    if wpo:  # WPO Eq. 2: loss times exp(mean log(p/sum p^2)) of chosen and rejected
        weight = np.exp(wpo_w[m] + wpo_l[m])
        total = total * weight
        want["wpo_weight"] = wmean(weight, w[m])
    reward_from = next((n for n in names if n != "sft"), names[0])
    r_w, r_l = (x[m] for x in np_pair_rewards(reward_from, opts, pw, pl, rw, rl, lw, ll))
    wm = w[m]
    want.update({
        "loss": wmean(total, wm),
        "rewards/chosen": wmean(r_w, wm),
        "rewards/rejected": wmean(r_l, wm),
        "rewards/margins": wmean(r_w - r_l, wm),
        "rewards/accuracies": wmean(r_w > r_l, wm),  # strict: a tie is not a win
        "logps/chosen": wmean(pw[m], wm),
        "logps/rejected": wmean(pl[m], wm),
    })
    return want


def run_pairs(cfg, inp, wpo=False):
    pw, pl, rw, rl, lw, ll, w, wpo_w, wpo_l = (jnp.asarray(a) for a in inp)
    extra = dict(chosen_wpo_logps=wpo_w, rejected_wpo_logps=wpo_l) if wpo else {}
    policy = losses.SequenceStats(pw, pl, lw, ll, **extra)
    ref = losses.SequenceStats(rw, rl, lw, ll)
    out = losses.preference_loss(cfg, policy, ref, weights=w)
    return logged(policy, out, np.asarray(inp[6]))


def loss_cfg(name, **opts):
    return losses.loss_config_from({"name": name, "beta": BETA, **opts})


REQUIRED = {"rdpo": {"rdpo_alpha": 0.05}}
PAIR_CASES = ([(n, REQUIRED.get(n, {})) for n in losses.LOSS_NAMES + ("plackett_luce",)] + [
    ("sigmoid", {"reference_free": True}),
    ("sigmoid", {"label_smoothing": 0.2}),
    ("ipo", {"ipo_logps": "sum"}),
    ("simpo", {"beta": 2.0, "simpo_gamma": 0.7}),
    ("rpo", {"rpo_alpha": 0.3}),
    ("dpop", {"dpop_lambda": 5.0}),
    ("bco_pair", {"beta": 0.5}),
])


@pytest.mark.parametrize("name,opts", PAIR_CASES, ids=lambda x: str(x))
def test_pair_loss_metrics_against_numpy(name, opts):
    inp = pair_inputs()
    got = run_pairs(loss_cfg(name, **opts), inp)
    want = golden_pair_metrics((name,), (1.0,), {"beta": BETA, **opts}, inp)
    assert_metrics(got, want)


def test_pair_inputs_exercise_ties_and_order():
    """The inputs hold what the goldens are meant to catch: a summed tie, a per-token-only tie,
    a wrong order, and padding garbage that would move any unweighted mean."""
    pw, pl, rw, rl, lw, ll, w, *_ = (np.asarray(a, np.float64) for a in pair_inputs())
    c_w, c_l = pw - rw, pl - rl
    assert c_w[0] == c_l[0] and pw[0] / lw[0] == pl[0] / ll[0]
    assert c_w[1] > c_l[1] and c_w[1] / lw[1] == c_l[1] / ll[1] and pw[1] / lw[1] == pl[1] / ll[1]
    assert c_w[2] < c_l[2]
    assert np.abs(pw[w == 0]).max() > 100 and set(w) == {0, 0.5, 1, 2}


@pytest.mark.parametrize("names,weights", [(("sigmoid", "sft"), (1.0, 0.5)),
                                           (("sft", "ipo"), (0.3, 1.0)),
                                           (("orpo", "dpop", "bco_pair"), (1.0, 0.2, 0.7))])
def test_combined_loss_metrics_against_numpy(names, weights):
    """Combined losses: the weighted sum, ``loss/<name>`` per component, every component's
    extras, rewards of the first listed component that is not sft."""
    inp = pair_inputs()
    got = run_pairs(loss_cfg(",".join(names), weights=weights), inp)
    assert_metrics(got, golden_pair_metrics(names, weights, {"beta": BETA}, inp))


@pytest.mark.parametrize("name", ["sigmoid", "simpo"])
def test_wpo_metrics_against_numpy(name):
    inp = pair_inputs()
    got = run_pairs(loss_cfg(name, use_weighting=True), inp, wpo=True)
    assert_metrics(got, golden_pair_metrics((name,), (1.0,), {"beta": BETA}, inp, wpo=True))


# ----------------------------------------------------------------------------- ranked lists


def ranked_inputs():
    """7 prompts, K = 4 slots best to worst (competition ranks; -1 = empty slot): a full list;
    a list of 2 and one of 3 (masked slots holding garbage); tied responses in the middle, at
    the bottom and a fully tied list; a list whose rewards are out of order; one padding
    prompt (weight 0). Weights 1 but one 2."""
    ranks = np.array([[0, 1, 2, 3], [0, 1, -1, -1], [0, 1, 1, 3], [0, 1, 2, -1],
                      [0, 0, 0, 0], [0, 1, 2, 2], [0, 1, 2, 3]], np.int32)
    pi = np.array([[-10, -12, -15, -20], [-8, -9, 500, 700], [-5, -7, -8, -9],
                   [-30, -20, -25, -900], [-4, -4, -6, -4], [-11, -13, -12, -12],
                   [300, -200, 50, 800]], np.float32)
    ref = np.array([[-11, -11, -14, -18], [-9, -8, -400, 600], [-6, -6, -6, -10],
                    [-29, -22, -24, 700], [-4, -5, -5, -3], [-10, -12, -11, -13],
                    [-100, 400, 30, -600]], np.float32)
    w = np.array([1, 1, 1, 2, 1, 1, 0], np.float32)
    return pi, ref, ranks, w


def golden_ranked_metrics(pi, ref, ranks, w, beta, top_k=None):
    pi, ref, w = (np.asarray(a, np.float64) for a in (pi, ref, w))
    mask = ranks >= 0
    B, K = pi.shape
    r = beta * (pi - ref)
    loss, _ = np_pl(pi - ref, mask.astype(np.float32), beta, top_k, np.where(mask, ranks, K))
    last = np.array([np.flatnonzero(mask[b]).max() for b in range(B)])
    acc = np.zeros(B)  # adjacent slots, both real, the second strictly worse
    for b in range(B):
        pairs = [r[b, k] > r[b, k + 1] for k in range(K - 1)
                 if mask[b, k] and mask[b, k + 1] and ranks[b, k + 1] > ranks[b, k]]
        acc[b] = np.mean(pairs) if pairs else 0.0
    r_w, r_l = r[:, 0], r[np.arange(B), last]
    want = {"loss": wmean(loss, w), "rewards/chosen": wmean(r_w, w),
            "rewards/rejected": wmean(r_l, w), "rewards/margins": wmean(r_w - r_l, w),
            "rewards/accuracies": wmean(acc, w), "logps/chosen": wmean(pi[:, 0], w),
            "logps/rejected": wmean(pi[np.arange(B), last], w)}
    for k in range(K):
        sel = mask[:, k] & (w > 0)
        want[f"rewards/rank_{k}"] = wmean(r[sel, k], w[sel])
    return want


@pytest.mark.parametrize("beta,top_k", [(0.1, None), (0.5, 2)])
def test_ranked_list_metrics_against_numpy(beta, top_k):
    pi, ref, ranks, w = ranked_inputs()
    cfg = loss_cfg("plackett_luce", beta=beta, **({"pl_top_k": top_k} if top_k else {}))
    mask = (ranks >= 0).astype(np.float32)
    lengths = np.where(ranks >= 0, 7.0, 0.0).astype(np.float32)
    out = losses.listwise_loss(cfg, jnp.asarray(pi), jnp.asarray(ref), jnp.asarray(mask),
                               jnp.asarray(ranks), jnp.asarray(w))
    policy = losses.ranked_stats(jnp.asarray(pi), jnp.asarray(lengths), jnp.asarray(mask))
    got = logged(policy, out, w)
    assert_metrics(got, golden_ranked_metrics(pi, ref, ranks, w, beta, top_k))


def test_ranked_inputs_exercise_ties_and_short_lists():
    pi, ref, ranks, w = ranked_inputs()
    r = pi.astype(np.float64) - ref
    assert r[2, 1] > r[2, 2] and ranks[2, 1] == ranks[2, 2]  # a tie ordered one way ...
    assert len(set(r[4])) > 1 and (ranks[4] == 0).all()  # ... a fully tied list
    assert (ranks[1] < 0).sum() == 2 and (ranks[3] < 0).sum() == 1  # short lists
    assert pi[1, 3] != 0 and pi[3, 3] != pi[3, 2]  # the last slot is not the last response


# ------------------------------------------------------------------------------------- KTO


def kto_inputs(kl_shift):
    """10 unpaired examples (6 desirable): z0 = mean(kl) over the 8 real ones = 2 + kl_shift
    (exact in float32); completions with c between 0 and z0, below 0, above z0 and exactly at
    z0 (a tie: neither side), per label; the last 2 examples are padding with garbage."""
    c = np.array([3, 1, 2, -1, 0.5, 2, -2, 5], np.float64)  # c = pi - ref of the real ones
    label = np.array([1, 1, 1, 1, 0, 0, 0, 1, 0, 1], np.float32)
    kl = np.array([1, 3, 2, 2, 0, 4, 2, 2], np.float64) + kl_shift
    ref = np.array([-30, -25, -40, -22, -18, -33, -27, -41], np.float64)
    rng = np.random.default_rng(5)
    pi = np.concatenate([ref + c, rng.normal(0, 1e3, 2).round()])
    ref = np.concatenate([ref, rng.normal(0, 1e3, 2).round()])
    ref_kl = np.concatenate([-rng.integers(10, 60, 8), rng.normal(0, 1e3, 2).round()])
    pi_kl = np.concatenate([ref_kl[:8] + kl, rng.normal(0, 1e3, 2).round()])
    w = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], np.float32)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    return tuple(map(f32, (pi, ref, pi_kl, ref_kl, label, w)))


def golden_kto_metrics(pi, ref, pi_kl, ref_kl, label, w, beta, dw, uw):
    loss, z0 = np_kto(pi, ref, pi_kl, ref_kl, label, w, beta, dw, uw)
    m = w > 0
    pi, ref, label = (np.asarray(a, np.float64)[m] for a in (pi, ref, label))
    c, good = pi - ref, label > 0
    right = np.where(good, c > z0, c < z0)  # strict: c == z0 is on neither side
    r = beta * c
    want = {"loss": loss.mean(), "kl": z0,
            "rewards/chosen": r[good].mean(), "rewards/rejected": r[~good].mean(),
            "rewards/margins": r[good].mean() - r[~good].mean(),
            "rewards/accuracies": right.mean(),
            "logps/chosen": pi[good].mean(), "logps/rejected": pi[~good].mean(),
            "count/desirable": good.mean()}
    return want


@pytest.mark.parametrize("kl_shift,opts", [(0.0, {}), (1.5, {"beta": 0.5}),
                                           (-7.0, {"desirable_weight": 1.5,
                                                   "undesirable_weight": 0.5})])
def test_kto_metrics_against_numpy(kl_shift, opts):
    pi, ref, pi_kl, ref_kl, label, w = kto_inputs(kl_shift)
    cfg = losses.loss_config_from({"name": "kto", "beta": BETA, **opts})
    lens = jnp.full(pi.shape, 9.0)
    policy = losses.SequenceStats(jnp.asarray(pi), jnp.asarray(pi_kl), lens, lens)
    ref_s = losses.SequenceStats(jnp.asarray(ref), jnp.asarray(ref_kl), lens, lens)
    out = losses.kto_loss(cfg, policy, ref_s, jnp.asarray(label), jnp.asarray(w))
    got = logged(policy, out, w)
    want = golden_kto_metrics(pi, ref, pi_kl, ref_kl, label, w, cfg.beta,
                              cfg.desirable_weight, cfg.undesirable_weight)
    assert_metrics(got, want)
    if kl_shift == 0.0:  # z0 = 2: a tie at z0 per label, and c in (0, z0) per label
        c = pi[:8].astype(np.float64) - ref[:8]
        assert want["kl"] == 2.0 and {1, 0} <= set(label[:8][c == 2.0])
        assert {1, 0} <= set(label[:8][(c > 0) & (c < 2)])
    if kl_shift < 0:
        assert want["kl"] == 0.0  # clamped
