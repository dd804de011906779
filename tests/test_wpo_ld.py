"""WPO (loss.use_weighting) and LD-DPO (loss.ld_alpha): the per-token quantities from the chunked
log-prob pass against float64 numpy on the full softmax, exact gradients, the loss-level
weighting, the DPO step against a direct numpy computation, and the refused combinations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import losses
from dpo_jax.config import base_config, read_config
from dpo_jax.logprobs import DENSE, LogprobConfig, max_scored_tokens, sequence_logps
from dpo_jax.step import StepConfig, make_eval_step
from dpo_jax.train_state import Frozen
from tests import helpers

jax.config.update("jax_default_matmul_precision", "highest")

CONFIGS = [
    DENSE,
    LogprobConfig(scored_only=False, seq_chunk=5, vocab_chunk=8),
    LogprobConfig(scored_only=True, seq_chunk=None, vocab_chunk=None),
    LogprobConfig(scored_only=True, seq_chunk=3, vocab_chunk=10),
]


def _np_terms(h, w, b, ids):
    """float64 per-token (log p(target), log sum_v p_v^2) from the full softmax."""
    logits = np.einsum("rld,vd->rlv", h[:, :-1].astype(np.float64), w.astype(np.float64)) + b
    return _np_logit_terms(logits, ids)


def _np_logit_terms(logits, ids):
    """float64 per-token (log p(target), log sum_v p_v^2) of float64 ``logits`` [R, L-1, V]
    that predict ``ids[:, 1:]``."""
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    target = np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    return target, np.log(np.exp(2 * logp).sum(-1))


def _np_ld_weights(mask_RS, shared_R, alpha):
    """Weight 1 for the first shared_R[r] scored tokens of row r, alpha after them."""
    rank = np.cumsum(mask_RS, axis=1)
    return mask_RS * np.where(rank <= shared_R[:, None], 1.0, alpha)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
def test_wpo_and_ld_sums_match_numpy(cfg):
    h, w, b, ids, mask = helpers.head_batch()
    target, log_sq = _np_terms(h, w, b, ids)
    m = mask[:, 1:]
    shared = np.array([4.0, 7.0, 2.0, 30.0], np.float32)
    want_ld = (target * _np_ld_weights(m, shared, 0.3)).sum(1)
    want_wpo = ((target - log_sq) * m).sum(1)
    n = max_scored_tokens(mask) if cfg.scored_only else None
    out = sequence_logps(h, ids, mask, w, b, cfg, max_scored=n, ld_shared_S=shared,
                         ld_alpha=0.3, with_wpo=True)
    sums, counts, wpo = out.sums, out.counts, out.wpo_sums
    np.testing.assert_allclose(sums, want_ld, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(wpo, want_wpo, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(counts, m.sum(1))
    assert np.all(want_wpo != (target * m).sum(1))


def test_ld_weights_in_packed_rows_count_within_each_sequence():
    h, w, b, ids, mask = helpers.head_batch(seed=3, rows=2, length=20)
    seq_index = helpers.packed_seq_index(mask)  # row 0 packs slots 0 and 2, row 1 slots 1 and 3
    target, log_sq = _np_terms(h, w, b, ids)
    shared = np.array([3.0, 2.0, 1.0, 4.0], np.float32)
    want, want_wpo = np.zeros(4), np.zeros(4)
    seen = np.zeros(4)
    for s, r, t in helpers.packed_tokens(mask, seq_index):
        seen[s] += 1
        want[s] += target[r, t] * (1.0 if seen[s] <= shared[s] else 0.5)
        want_wpo[s] += target[r, t] - log_sq[r, t]
    out = sequence_logps(h, ids, mask, w, b, LogprobConfig(seq_chunk=4, vocab_chunk=16),
                         max_scored=max_scored_tokens(mask), seq_index_RL=seq_index,
                         num_seqs=4, ld_shared_S=shared, ld_alpha=0.5, with_wpo=True)
    sums, wpo = out.sums, out.wpo_sums
    np.testing.assert_allclose(sums, want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(wpo, want_wpo, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cfg", CONFIGS[1:], ids=str)
def test_gradients_exact_with_wpo_and_ld(cfg):
    """The WPO term carries no gradient; LD-weighted sums differentiate exactly as dense."""
    h, w, b, ids, mask = helpers.head_batch(seed=1)
    coef = jnp.asarray(np.random.default_rng(2).normal(size=h.shape[0]).astype(np.float32))
    shared = jnp.asarray([5.0, 3.0, 8.0, 1.0])
    n = max_scored_tokens(mask) if cfg.scored_only else None

    def f(h, w, b, c, n, wpo):
        out = sequence_logps(h, ids, mask, w, b, c, max_scored=n, ld_shared_S=shared,
                             ld_alpha=0.25, with_wpo=wpo)
        extra = jnp.sum(out.wpo_sums * 7.0) if wpo else 0.0
        return jnp.sum(out.sums * coef) + extra

    want = jax.grad(f, argnums=(0, 1, 2))(h, w, b, DENSE, None, False)
    got = jax.grad(f, argnums=(0, 1, 2))(h, w, b, cfg, n, True)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5)


def test_wpo_multiplies_each_pair_loss_by_both_weights():
    rng = np.random.default_rng(0)
    B = 6
    pw, pl = (-rng.uniform(5, 30, B)).astype(np.float32), (-rng.uniform(5, 30, B)).astype(np.float32)
    rw, rl = pw + rng.normal(0, 2, B).astype(np.float32), pl + rng.normal(0, 2, B).astype(np.float32)
    lw, ll = np.full(B, 10.0, np.float32), np.full(B, 12.0, np.float32)
    aw, al = (-rng.uniform(0, 2, B)).astype(np.float32), (-rng.uniform(0, 2, B)).astype(np.float32)
    cfg = helpers.loss_config("sigmoid", use_weighting=True)
    pol = losses.SequenceStats(*(jnp.asarray(a) for a in (pw, pl, lw, ll, aw, al)))
    ref = losses.SequenceStats(*(jnp.asarray(a) for a in (rw, rl, lw, ll)))
    out = losses.preference_loss(cfg, pol, ref)
    h = (pw.astype(np.float64) - rw) - (pl - rl)
    want = np.logaddexp(0, -0.1 * h) * np.exp(aw.astype(np.float64)) * np.exp(al.astype(np.float64))
    np.testing.assert_allclose(np.asarray(out.losses), want, rtol=1e-5)
    np.testing.assert_allclose(float(out.extras["wpo_weight"]), np.mean(np.exp(aw + al.astype(np.float64))), rtol=1e-5)
    with pytest.raises(ValueError, match="use_weighting"):
        losses.preference_loss(cfg, losses.SequenceStats(*(jnp.asarray(a) for a in (pw, pl, lw, ll))), ref)


@pytest.mark.parametrize("opts", [{"use_weighting": True}, {"ld_alpha": 0.4},
                                  {"use_weighting": True, "ld_alpha": 0.0}], ids=str)
def test_dpo_step_with_wpo_and_ld_matches_numpy(opts):
    """The eval step's mean loss against float64 numpy on the model's full logits: LD weights
    in both models' sums, WPO weights from the policy (TRL's definitions)."""
    model = helpers.tiny_model()
    params = helpers.init_params(model, seed=0)
    ref_params = helpers.perturbed(params, scale=0.05, seed=5)
    pairs = helpers.synthetic_pairs(8, seed=3)
    batch_np = helpers.pair_batch(pairs)
    loss_cfg = helpers.loss_config("sigmoid", beta=0.5, **opts)
    batch, n = helpers.device_batch(batch_np)
    sums = make_eval_step(model, loss_cfg, StepConfig(logprobs=LogprobConfig(seq_chunk=4)))(
        params, Frozen(reference=ref_params), batch, n)
    got = float(sums["loss"][0]) / float(sums["loss"][1])

    ids, pos, seg = (batch_np[k] for k in ("input_ids", "positions", "segment_ids"))
    m = batch_np["loss_mask"][:, 1:].astype(np.float64)
    B = len(pairs)
    lengths = m.sum(1)
    shared = np.minimum(lengths[:B], lengths[B:])
    shared = np.concatenate([shared, shared])
    tok_w = _np_ld_weights(m, shared, opts["ld_alpha"]) if "ld_alpha" in opts else m

    def terms(p):
        logits = np.asarray(jax.jit(model.logits)(p, ids, pos, seg), np.float64)[:, :-1]
        return _np_logit_terms(logits, ids)

    t_pol, sq_pol = terms(params)
    t_ref, _ = terms(ref_params)
    s_pol, s_ref = (t_pol * tok_w).sum(1), (t_ref * tok_w).sum(1)
    h = (s_pol[:B] - s_ref[:B]) - (s_pol[B:] - s_ref[B:])
    loss = np.logaddexp(0, -0.5 * h)
    if opts.get("use_weighting"):
        wpo = np.exp(((t_pol - sq_pol) * m).sum(1) / lengths)
        loss = loss * wpo[:B] * wpo[B:]
    np.testing.assert_allclose(got, loss.mean(), rtol=2e-5, atol=2e-6)


def test_refused_combinations_and_values():
    c = base_config()
    c.loss.ld_alpha = 0.5
    c.logprobs.precompute_reference = True
    with pytest.raises(ValueError, match="ld_alpha.*precompute_reference"):
        read_config(c)
    c.loss.ld_alpha = None
    c.loss.use_weighting = True
    assert read_config(c).precompute_reference  # WPO reads the policy only: allowed
    with pytest.raises(ValueError, match=r"ld_alpha must be in \[0, 1\]"):
        helpers.loss_config("sigmoid", ld_alpha=1.5)
    with pytest.raises(ValueError, match="use_weighting must be a bool"):
        losses.loss_config_from({"name": "sigmoid", "use_weighting": "yes"})
    model = helpers.tiny_model()
    params = helpers.init_params(model)
    batch, n = helpers.device_batch(helpers.pair_batch(helpers.synthetic_pairs(8)))
    batch = dict(batch, ref_logps=jnp.zeros(16), ref_lengths=jnp.ones(16))
    step = make_eval_step(model, helpers.loss_config("sigmoid", ld_alpha=0.5), StepConfig())
    with pytest.raises(ValueError, match="ld_alpha.*precompute_reference=False"):
        step(params, None, batch, n)
