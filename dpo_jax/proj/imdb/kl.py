"""Sequence-level KL(pi || pi_ref): the x-axis of the paper's reward/KL frontier (Figure 2).

``KL(pi || pi_ref) = E_{y ~ pi(.|x)} [log pi(y|x) - log pi_ref(y|x)]``, where ``log pi(y|x)``
sums the completion tokens' log-probs. :func:`kl_estimate` is the Monte-Carlo estimate from
completions *sampled from pi* (the ones that were also scored for reward), averaged over
prompts and samples. It is unbiased, but a single sample's term can be negative; only the mean
is a KL. :func:`exact_sequence_kl` enumerates every sequence of a tiny autoregressive model, so
tests can check the estimator (and anyone's log-prob bookkeeping) against the truth.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import numpy as np

# prefixes int [N, t] (t may be 0) -> next-token log-prob table float [N, V]
NextTokenLogProbFn = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class KLEstimate:
    """Mean of per-sample log-ratios, its standard error, and the number of samples."""

    mean: float
    stderr: float
    n: int


def sequence_logps(token_logps: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Sum per-token log-probs over completion tokens: ``[N, T]`` (+ mask ``[N, T]``) -> ``[N]``.

    A 1-D input is taken as already summed. The mask must exclude prompt and padding tokens:
    the prompt is shared by pi and pi_ref, so it is not part of the completion's KL.
    """
    lp = np.asarray(token_logps, np.float64)
    if lp.ndim == 1:
        if mask is not None:
            raise ValueError("a mask only applies to per-token [N, T] log-probs")
        return lp
    if lp.ndim != 2:
        raise ValueError(f"log-probs must be [N] or [N, T], got shape {lp.shape}")
    if mask is not None:
        mask = np.asarray(mask, np.float64)
        if mask.shape != lp.shape:
            raise ValueError(f"mask {mask.shape} does not match log-probs {lp.shape}")
        lp = np.where(mask > 0, lp, 0.0)  # where, not *: padding may hold -inf
    return lp.sum(axis=1)


def kl_estimate(
    policy_logps: np.ndarray, ref_logps: np.ndarray, mask: np.ndarray | None = None
) -> KLEstimate:
    """Monte-Carlo sequence KL from samples of the policy (log-probs per token or summed).

    ``policy_logps`` and ``ref_logps`` are log pi and log pi_ref of the *same* completions,
    each sampled from pi. Returns the sample mean of the summed log-ratio and its standard
    error (``std / sqrt(n)``), which the frontier plot can show as an error bar.
    """
    diff = sequence_logps(policy_logps, mask) - sequence_logps(ref_logps, mask)
    n = int(diff.shape[0])
    if n == 0:
        raise ValueError("no samples")
    stderr = float(diff.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return KLEstimate(float(diff.mean()), stderr, n)


# --------------------------------------------------------------------------------------------
# Exact KL for tiny models (tests)
# --------------------------------------------------------------------------------------------


def enumerate_sequences(vocab_size: int, length: int) -> np.ndarray:
    """All ``vocab_size ** length`` sequences, int64 ``[V**T, T]`` in lexicographic order."""
    if vocab_size ** length > 2_000_000:
        raise ValueError(f"{vocab_size}**{length} sequences is too many to enumerate")
    seqs = list(itertools.product(range(vocab_size), repeat=length))
    return np.asarray(seqs, np.int64).reshape(len(seqs), length)


def sequence_log_probs(fn: NextTokenLogProbFn, seqs: np.ndarray) -> np.ndarray:
    """``sum_t log p(y_t | y_<t)`` for each row of ``seqs`` under ``fn``, float64 ``[N]``."""
    seqs = np.asarray(seqs, np.int64)
    total = np.zeros(seqs.shape[0], np.float64)
    for t in range(seqs.shape[1]):
        table = np.asarray(fn(seqs[:, :t]), np.float64)
        total += table[np.arange(seqs.shape[0]), seqs[:, t]]
    return total


def exact_sequence_kl(
    policy_fn: NextTokenLogProbFn, ref_fn: NextTokenLogProbFn, vocab_size: int, length: int
) -> float:
    """``sum_y pi(y) (log pi(y) - log pi_ref(y))`` over all length-``length`` sequences."""
    seqs = enumerate_sequences(vocab_size, length)
    lp = sequence_log_probs(policy_fn, seqs)
    lq = sequence_log_probs(ref_fn, seqs)
    p = np.exp(lp)
    if not np.isclose(p.sum(), 1.0, atol=1e-6):
        raise ValueError(f"policy probabilities sum to {p.sum()}, not 1: fn must give log-probs")
    return float(np.sum(np.where(p > 0, p * (lp - lq), 0.0)))


def sample_sequences(
    fn: NextTokenLogProbFn, vocab_size: int, length: int, n: int, rng: np.random.Generator
) -> np.ndarray:
    """``n`` ancestral samples of length ``length`` from ``fn``, int64 ``[n, length]``."""
    seqs = np.zeros((n, 0), np.int64)
    for _ in range(length):
        probs = np.exp(np.asarray(fn(seqs), np.float64))
        probs /= probs.sum(axis=1, keepdims=True)
        u = rng.random((n, 1))
        nxt = np.minimum((probs.cumsum(axis=1) < u).sum(axis=1), vocab_size - 1)
        seqs = np.concatenate([seqs, nxt[:, None]], axis=1)
    return seqs
