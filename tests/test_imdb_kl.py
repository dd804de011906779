"""Sequence-level KL: Monte-Carlo estimate vs exact enumeration on a tiny autoregressive toy."""

from __future__ import annotations

import numpy as np
import pytest

from dpo_jax.proj.imdb import kl


def make_toy(seed: int, vocab: int = 3, length: int = 2, temperature: float = 1.0):
    """A random autoregressive model whose next-token table depends on the whole prefix."""
    rng = np.random.default_rng(seed)
    tables = {}
    for t in range(length):
        for prefix in np.ndindex(*([vocab] * t)) if t else [()]:
            tables[tuple(prefix)] = rng.normal(size=vocab) * 1.5 / temperature

    def fn(prefixes: np.ndarray) -> np.ndarray:
        logits = np.stack([tables[tuple(int(x) for x in row)] for row in prefixes])
        return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)

    return fn


def test_estimate_is_zero_when_policy_is_reference():
    fn = make_toy(0)
    seqs = kl.sample_sequences(fn, 3, 2, 500, np.random.default_rng(0))
    lp = kl.sequence_log_probs(fn, seqs)
    est = kl.kl_estimate(lp, lp)
    assert est.mean == 0.0 and est.stderr == 0.0 and est.n == 500
    assert kl.exact_sequence_kl(fn, fn, 3, 2) == pytest.approx(0.0, abs=1e-12)


def test_monte_carlo_matches_exact_enumeration():
    pi, ref = make_toy(1), make_toy(2)
    exact = kl.exact_sequence_kl(pi, ref, vocab_size=3, length=2)
    assert exact > 0.1  # distinct random models: a KL worth estimating
    seqs = kl.sample_sequences(pi, 3, 2, 20_000, np.random.default_rng(0))
    est = kl.kl_estimate(kl.sequence_log_probs(pi, seqs), kl.sequence_log_probs(ref, seqs))
    assert abs(est.mean - exact) < 4 * est.stderr, (est, exact)
    assert est.stderr < 0.05


def test_exact_kl_against_closed_form_for_independent_tokens():
    """Independent steps: the sequence KL is the sum of per-step categorical KLs."""
    p = np.log(np.array([0.7, 0.2, 0.1]))
    q = np.log(np.array([0.2, 0.3, 0.5]))
    pi = lambda prefixes: np.tile(p, (len(prefixes), 1))  # noqa: E731
    ref = lambda prefixes: np.tile(q, (len(prefixes), 1))  # noqa: E731
    one_step = float(np.sum(np.exp(p) * (p - q)))
    assert kl.exact_sequence_kl(pi, ref, 3, 3) == pytest.approx(3 * one_step, rel=1e-10)


def test_per_token_logps_with_mask():
    policy = np.array([[-1.0, -2.0, -np.inf], [-0.5, -0.5, -0.5]])
    ref = np.array([[-1.5, -2.5, 0.0], [-1.0, -1.0, -1.0]])
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    assert kl.sequence_logps(policy, mask).tolist() == [-3.0, -1.5]
    est = kl.kl_estimate(policy, ref, mask)
    assert est.mean == pytest.approx((1.0 + 1.5) / 2) and est.n == 2
    with pytest.raises(ValueError):
        kl.sequence_logps(policy, mask[:, :2])
    with pytest.raises(ValueError):
        kl.kl_estimate(np.zeros(0), np.zeros(0))


def test_sampler_frequencies_match_probabilities():
    fn = make_toy(3)
    seqs = kl.sample_sequences(fn, 3, 2, 30_000, np.random.default_rng(1))
    all_seqs = kl.enumerate_sequences(3, 2)
    probs = np.exp(kl.sequence_log_probs(fn, all_seqs))
    freq = np.array([(seqs == s).all(axis=1).mean() for s in all_seqs])
    assert np.abs(freq - probs).max() < 0.015
    assert probs.sum() == pytest.approx(1.0)
