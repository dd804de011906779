"""Log-probs: chunked/compacted paths equal a direct per-token numpy computation, gradients too."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.logprobs import DENSE, LogprobConfig, max_scored_tokens, sequence_logps, token_logps
from tests.helpers import head_batch as _batch  # (h, w, b, ids, mask)
from tests.helpers import packed_seq_index, packed_tokens

jax.config.update("jax_default_matmul_precision", "highest")


def _numpy_token_logps(h, w, b, targets):
    logits = np.einsum("rld,vd->rlv", h.astype(np.float64), w.astype(np.float64))
    if b is not None:
        logits = logits + b
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return np.take_along_axis(logp, targets[..., None], -1)[..., 0]




CONFIGS = [
    DENSE,
    LogprobConfig(scored_only=False, seq_chunk=4, vocab_chunk=None),
    LogprobConfig(scored_only=False, seq_chunk=5, vocab_chunk=8),
    LogprobConfig(scored_only=True, seq_chunk=None, vocab_chunk=None),
    LogprobConfig(scored_only=True, seq_chunk=3, vocab_chunk=10),
    LogprobConfig(scored_only=True, seq_chunk=128, vocab_chunk=36),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_sequence_logps_match_direct_computation(cfg):
    h, w, b, ids, mask = _batch()
    tok = _numpy_token_logps(h[:, :-1], w, b, ids[:, 1:])
    want = (tok * mask[:, 1:]).sum(1)
    max_scored = max_scored_tokens(mask) if cfg.scored_only else None
    out = sequence_logps(h, ids, mask, w, b, cfg, max_scored=max_scored)
    got, lengths = out.sums, out.counts
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(lengths, mask[:, 1:].sum(1))


def test_prompt_and_padding_tokens_are_ignored():
    h, w, b, ids, mask = _batch()
    base = sequence_logps(h, ids, mask, w, b, LogprobConfig(seq_chunk=4, vocab_chunk=9), max_scored=16).sums
    ids2, h2 = ids.copy(), h.copy()
    outside = mask == 0
    outside[:, 0] = True
    # Change every unscored target token; hidden states before the first scored one too.
    ids2[outside] = (ids2[outside] + 5) % w.shape[0]
    h2[:, :2] += 3.0
    again = sequence_logps(h2, ids2, mask, w, b, LogprobConfig(seq_chunk=4, vocab_chunk=9), max_scored=16).sums
    np.testing.assert_allclose(again, base, rtol=1e-6)


@pytest.mark.parametrize("cfg", CONFIGS[1:], ids=str)
def test_gradients_equal_dense_path(cfg):
    h, w, b, ids, mask = _batch(seed=1)
    weights = jnp.asarray(np.random.default_rng(2).normal(size=h.shape[0]).astype(np.float32))
    max_scored = max_scored_tokens(mask) if cfg.scored_only else None

    def f(h, w, b, c, n):
        s = sequence_logps(h, ids, mask, w, b, c, max_scored=n).sums
        return jnp.sum(s * weights)

    want = jax.grad(f, argnums=(0, 1, 2))(h, w, b, DENSE, None)
    got = jax.grad(f, argnums=(0, 1, 2))(h, w, b, cfg, max_scored)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def test_packed_sequences_sum_by_slot():
    h, w, b, ids, mask = _batch(seed=3, rows=2, length=20)
    seq_index = packed_seq_index(mask)  # row 0 packs slots 0 and 2, row 1 slots 1 and 3
    tok = _numpy_token_logps(h[:, :-1], w, b, ids[:, 1:]) * mask[:, 1:]
    want = np.zeros(4)
    for s, r, t in packed_tokens(mask, seq_index):
        want[s] += tok[r, t]
    out = sequence_logps(h, ids, mask, w, b, LogprobConfig(seq_chunk=4, vocab_chunk=16),
                         max_scored=max_scored_tokens(mask), seq_index_RL=seq_index, num_seqs=4)
    got, counts = out.sums, out.counts
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert counts.sum() == mask[:, 1:].sum()


@pytest.mark.parametrize("cfg", [DENSE, LogprobConfig(seq_chunk=4, vocab_chunk=8)], ids=str)
def test_saturated_logits_stay_finite_and_exact(cfg):
    """Logits of a few thousand: the max-shifted (online) logsumexp neither overflows nor
    loses the answer."""
    h, w, b, ids, mask = _batch(seed=4)
    h = h * 300.0
    got = sequence_logps(h, ids, mask, w, b, cfg, max_scored=16 if cfg.scored_only else None).sums
    assert np.all(np.isfinite(got))
    want = (_numpy_token_logps(h[:, :-1], w, b, ids[:, 1:]) * mask[:, 1:]).sum(1)
    assert np.abs(want).max() > 1e3  # saturated: most targets are far below the max logit
    np.testing.assert_allclose(got, want, rtol=1e-4)


@pytest.mark.parametrize("cfg", [LogprobConfig(seq_chunk=4, vocab_chunk=8),
                                 LogprobConfig(seq_chunk=None, vocab_chunk=None)], ids=str)
def test_token_logps_bf16_inputs_accumulate_in_float32(cfg):
    """bf16 hidden states and head: logits, the running max and the running sum of the
    (online) logsumexp are float32, so the result equals float64 numpy on the same
    bf16-rounded inputs up to float32 rounding. bf16 keeps 8 mantissa bits, so an
    accumulation in bf16 anywhere on the way misses this tolerance by orders of magnitude."""
    h, w, b, ids, _ = _batch(seed=5)
    h16, w16 = jnp.asarray(h, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    got = token_logps(h16, ids, w16, b, cfg)
    assert got.dtype == jnp.float32
    want = _numpy_token_logps(np.asarray(h16, np.float64), np.asarray(w16, np.float64), b, ids)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_max_scored_tokens_is_a_power_of_two_bound():
    mask = np.zeros((3, 300), np.float32)
    mask[0, 10:50] = 1  # 40 scored -> 64
    assert max_scored_tokens(mask) == 64
    mask[1, 1:300] = 1  # 299 scored, capped at the 299 shifted positions
    assert max_scored_tokens(mask) == 299


@pytest.mark.parametrize("cfg", [DENSE, LogprobConfig(seq_chunk=4, vocab_chunk=8)], ids=str)
def test_final_logit_softcap_applies_in_every_tiling(cfg):
    """Gemma 2's final soft-cap ``cap * tanh(logit / cap)`` before the log-softmax, on the
    whole vocabulary and on vocabulary slices alike (float64 numpy reference)."""
    h, w, b, ids, _ = _batch(seed=6)
    cap = 3.0
    logits = np.einsum("rld,vd->rlv", h[:, :-1].astype(np.float64), w.astype(np.float64)) + b
    logits = cap * np.tanh(logits / cap)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                          keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    got = token_logps(h[:, :-1], ids[:, 1:], w, b, cfg, softcap=cap)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    uncapped = token_logps(h[:, :-1], ids[:, 1:], w, b, cfg)
    assert np.max(np.abs(np.asarray(uncapped) - want)) > 1e-2  # the cap matters here
