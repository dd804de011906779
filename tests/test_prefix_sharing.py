"""Prefix-shared pairs (``data.prefix_sharing``, ``dpo_jax/data/prefix.py``) against the
unshared layout: the same pairs through the real pipeline in both layouts give the same
per-sequence log-probs, losses, gradients and updates to float32 round-off.

Why per-sequence log-probs and their vector-Jacobian product suffice for every loss: each loss
is a function of the per-sequence sums and scored counts alone (``losses.SequenceStats``), so
equal sums, counts and ``d sums / d params`` (checked here with a random cotangent) give equal
losses and gradients; the step-level tests then run the real train step on a few losses, on
the three mesh shapes, packed, and with stored reference log-probs.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import losses as losses_lib
from dpo_jax import reference
from dpo_jax.data import PreferencePipeline, prefix
from dpo_jax.logprobs import LogprobConfig
from dpo_jax.models import Model, preset
from dpo_jax.models.layers import segment_causal_mask
from dpo_jax.step import StepConfig, sequence_stats
from tests import helpers

jax.config.update("jax_default_matmul_precision", "highest")

LOGP_TOL = dict(rtol=1e-5, atol=2e-5)  # summed log-probs of ~15 tokens, float32


def _pairs(n=8, seed=0):
    return helpers.synthetic_pairs(n, seed)


def _both(pairs, **fields):
    """The first eval batch of ``pairs`` unshared and prefix-shared (numpy)."""
    return (helpers.pair_batch(pairs, **fields),
            helpers.pair_batch(pairs, prefix_sharing=True, **fields))


_rel = helpers.rel_diff


# ----------------------------------------------------------------------------- layout


def test_unit_layout_of_one_pair():
    """[prompt[:-1] | prompt[-1], chosen | prompt[-1], rejected]: positions continue the prompt
    in both branches, each response token is scored from the column before it and carries its
    slot (chosen i, rejected B + i); K = 3 responses get branches 1..3."""
    pair = {"prompt": np.array([5, 6, 7], np.int32), "chosen": np.array([8, 9], np.int32),
            "rejected": np.array([10, 11, 12], np.int32)}
    b = prefix.layout([pair, pair], pad_id=0)
    np.testing.assert_array_equal(b["input_ids"][0], [5, 6, 7, 8, 9, 7, 10, 11, 12])
    np.testing.assert_array_equal(b["positions"][0], [0, 1, 2, 3, 4, 2, 3, 4, 5])
    np.testing.assert_array_equal(b["branch_ids"][0], [0, 0, 1, 1, 1, 2, 2, 2, 2])
    np.testing.assert_array_equal(b["loss_mask"][0], [0, 0, 0, 1, 1, 0, 1, 1, 1])
    np.testing.assert_array_equal(b["seq_index"][1], [-1, -1, -1, 1, 1, -1, 3, 3, 3])
    np.testing.assert_array_equal(b["segment_ids"], np.ones((2, 9)))
    assert prefix.unit_lengths(np.array([[3, 2, 3], [0, 2, 3], [1, 1, 1]])).tolist() == [9, 5, 4]
    tokens, positions, branch, scored = prefix.unit_columns(
        pair["prompt"], [pair["chosen"], pair["rejected"], np.array([13], np.int32)])
    assert branch.tolist() == [0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3]
    assert positions[-2:].tolist() == [2, 3] and scored[-2:].tolist() == [0, 1]
    empty = prefix.unit_columns(np.zeros(0, np.int32), [pair["chosen"], pair["rejected"]])
    assert empty[1].tolist() == [0, 1, 0, 1, 2] and empty[3].tolist() == [0, 1, 0, 1, 1]


@pytest.mark.parametrize("pack_length, pack_length_step, shape", [(96, 0, (6, 96)),
                                                                 (48, 16, (8, 64))])
def test_packed_units_and_the_pipelines_token_count(pack_length, pack_length_step, shape):
    """Packed: several units per row, segment ids 1, 2, ... per unit; every scored token of the
    unshared batch appears once, under the same slot; fewer columns than unshared
    (``pack_length`` 48 alone puts one unit in each of 16 rows; ``pack_length_step`` 16 finds
    8 rows of 64)."""
    pairs = _pairs(16)
    plain, shared = _both(pairs, packing=True, pack_length=pack_length,
                          buckets=str(pack_length), pack_length_step=pack_length_step)
    assert shared["input_ids"].shape == shape
    assert shared["segment_ids"].max() >= 2
    for s in range(32):
        assert (shared["seq_index"] == s).sum() == (plain["seq_index"] == s).sum() > 0
    assert set(np.unique(shared["branch_ids"])) == {0, 1, 2}
    lengths = prefix.unit_lengths(np.asarray([[len(p[k]) for k in ("prompt", "chosen",
                                                                     "rejected")] for p in pairs]))
    assert (shared["segment_ids"] > 0).sum() == lengths.sum()
    assert lengths.sum() < sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"])
                               for p in pairs)


@pytest.mark.parametrize("window", [None, 3])
def test_mask_is_the_branch_rule(window):
    """segment_causal_mask with branch ids against the rule written out per (i, j): same
    segment, j <= i, j on the prompt or on i's branch, and pos_i - pos_j < window."""
    b = prefix.layout(_pairs(3), pad_id=0, packing=True, pack_length=128, buckets=[128])
    seg, br, pos = b["segment_ids"], b["branch_ids"], b["positions"]
    got = np.asarray(segment_causal_mask(jnp.asarray(seg), window, jnp.asarray(br),
                                         jnp.asarray(pos)))[:, 0]
    R, L = seg.shape
    want = np.zeros((R, L, L), bool)
    for r in range(R):
        for i in range(L):
            for j in range(i + 1):
                want[r, i, j] = (seg[r, i] == seg[r, j] and br[r, j] in (0, br[r, i])
                                 and (window is None or pos[r, i] - pos[r, j] < window))
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------- exactness

FAMILIES = {
    "learned": ("tiny-gpt2", {}),
    "rotary": ("tiny-neox", {}),
    "scaled_rotary_gqa": ("tiny-llama", {}),
    "sliding_window": ("tiny-llama", dict(sliding_window=5)),
    "gemma_sliding_softcaps": ("tiny-gemma", {}),
    "chunked_attention": ("tiny-llama", dict(attention_impl="chunked", attention_chunk=16)),
    "chunked_skip_blocks": ("tiny-llama", dict(attention_impl="chunked", attention_chunk=16,
                                               attention_skip_blocks=True)),
}


# MoE and LoRA run fast in test_trees.py (the same mask code path); block skipping in
# test_tree_mask.py.
@pytest.mark.parametrize("family", helpers.fast_cases(
    list(FAMILIES), {"gemma_sliding_softcaps"}))
def test_sequence_logps_and_their_gradient_match_unshared(family):
    """Per-sequence log-prob sums, counts and the vector-Jacobian product with a random
    cotangent over the 2B sequences: every model family, dense and chunked attention, with a
    sliding window shorter than the prompts (so the window is measured in positions)."""
    name, overrides = FAMILIES[family]
    model = Model(preset(name, **overrides))
    params = helpers.init_params(model)
    cfg = StepConfig(logprobs=LogprobConfig(scored_only=True, seq_chunk=16))
    cot = jnp.asarray(np.random.default_rng(0).normal(size=16), jnp.float32)
    out = [helpers.logps_and_vjp(model, params, b, cfg, cot) for b in _both(_pairs(8))]
    (lp0, n0, g0), (lp1, n1, g1) = out
    np.testing.assert_array_equal(n1, n0)
    np.testing.assert_allclose(lp1, lp0, **LOGP_TOL)
    assert _rel(g1, g0) < 1e-5


def test_every_loss_from_the_shared_stats():
    """Policy and reference statistics from the shared and unshared batches (one jitted
    forward each, with WPO's weights and LD-DPO's weighting) give every loss of LOSS_NAMES,
    WPO and LD-DPO the same per-pair losses and rewards."""
    model = helpers.tiny_model()
    params, ref_params = helpers.init_params(model), helpers.init_params(model, seed=1)
    cfg = StepConfig()
    ld_cfg = helpers.loss_config(ld_alpha=0.5)

    @jax.jit
    def stats(batch):
        return (sequence_stats(model, params, batch, cfg, None, with_wpo=True),
                sequence_stats(model, params, batch, cfg, None, loss_cfg=ld_cfg),
                sequence_stats(model, ref_params, batch, cfg, None),
                sequence_stats(model, ref_params, batch, cfg, None, loss_cfg=ld_cfg))

    cases = [(n, {"rdpo_alpha": 0.01} if n == "rdpo" else {}) for n in losses_lib.LOSS_NAMES]
    cases += [("sigmoid", dict(use_weighting=True)), ("sigmoid", dict(ld_alpha=0.5))]
    results = []
    for batch_np in _both(_pairs(8)):
        policy, policy_ld, ref, ref_ld = jax.device_get(
            stats({k: jnp.asarray(v) for k, v in batch_np.items()}))
        per_loss = []
        for name, opts in cases:
            ld = "ld_alpha" in opts
            p, r = (policy_ld, ref_ld) if ld else (policy, ref)
            out = losses_lib.preference_loss(helpers.loss_config(name, **opts),
                                             _seq_stats(p), _seq_stats(r))
            per_loss.append(np.stack([out.losses, out.chosen_rewards, out.rejected_rewards]))
        results.append(per_loss)
    for (name, opts), a, b in zip(cases, *results):
        np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-5, err_msg=f"{name} {opts}")


def _seq_stats(s):
    logps, lengths, wpo = s.logps, s.lengths, s.wpo_logps
    half = len(logps) // 2
    return losses_lib.SequenceStats(
        chosen_logps=logps[:half], rejected_logps=logps[half:], chosen_lengths=lengths[:half],
        rejected_lengths=lengths[half:], chosen_wpo_logps=None if wpo is None else wpo[:half],
        rejected_wpo_logps=None if wpo is None else wpo[half:])


_one_step = helpers.sgd_step


def _assert_same_step(a, b):
    (update0, m0), (update1, m1) = a, b
    for k in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
        np.testing.assert_allclose(m1[k], m0[k], rtol=2e-5, atol=2e-6, err_msg=k)
    assert helpers.global_norm(update0) > 0 and _rel(update1, update0) < 1e-5


MESHES = {"dp": {"data": 8, "fsdp": 1, "tensor": 1}, "fsdp": {"data": 1, "fsdp": 8, "tensor": 1},
          "mixed": {"data": 2, "fsdp": 2, "tensor": 2}}


@pytest.mark.parametrize("mesh_name", [m if m == "mixed" else pytest.param(m, marks=pytest.mark.slow) for m in MESHES])
def test_train_step_on_every_mesh(mesh_name):
    """One SGD step (lr 1, so the update is the gradient) with the online reference forward:
    loss, metrics and updated parameters equal on meshes (8,1,1), (1,8,1), (2,2,2)."""
    model = helpers.tiny_model()
    params, ref_params = helpers.init_params(model), helpers.init_params(model, seed=1)
    mesh_ = helpers.mesh(MESHES[mesh_name])
    steps = [_one_step(model, params, ref_params, b, helpers.loss_config(beta=0.5), mesh_)
             for b in _both(_pairs(8))]
    _assert_same_step(*steps)


@pytest.mark.parametrize("loss", ["sigmoid_norm"] + [pytest.param(x, marks=pytest.mark.slow)
                                                     for x in ("ipo", "simpo")])
def test_train_step_packed_rows_and_length_normalised_losses(loss):
    """Packed rows in both layouts (several units per shared row), length-normalised losses."""
    model = helpers.tiny_model()
    params, ref_params = helpers.init_params(model), helpers.init_params(model, seed=1)
    loss_cfg = helpers.loss_config(loss, beta=0.5)
    ref = ref_params if losses_lib.needs_reference(loss_cfg) else None
    batches = _both(_pairs(16), packing=True, pack_length=96, buckets="96", row_multiple=8)
    assert batches[1]["segment_ids"].max() >= 2
    steps = [_one_step(model, params, ref, b, loss_cfg, helpers.mesh()) for b in batches]
    _assert_same_step(*steps)


def test_precomputed_reference_and_its_step(tmp_path):
    """Stored reference log-probs computed through prefix-shared batches equal the unshared
    ones; a step reading them from the shared pipeline equals the unshared step."""
    model = helpers.tiny_model()
    params, ref_params = helpers.init_params(model), helpers.init_params(model, seed=1)
    pairs = _pairs(8)
    mesh_ = helpers.mesh(MESHES["mixed"])
    stored = [reference.compute_pair_logps(
        model, ref_params, {"train": pairs}, helpers.data_config(prefix_sharing=shared),
        StepConfig(), mesh_, global_batch_size=4)["train"] for shared in (False, True)]
    np.testing.assert_array_equal(stored[1][1], stored[0][1])
    np.testing.assert_allclose(stored[1][0], stored[0][0], **LOGP_TOL)
    steps = []
    for shared, ref in zip((False, True), stored):
        pipe = PreferencePipeline(pairs, helpers.data_config(prefix_sharing=shared),
                                  train=False, global_batch_size=8, reference=ref)
        steps.append(_one_step(model, params, None, next(iter(pipe)),
                               helpers.loss_config(beta=0.5), mesh_))
    _assert_same_step(*steps)


def test_max_scored_steps_per_octave():
    """A shared row scores both responses: 130 scored tokens take 256 head slots at the
    default power-of-two bound, 160 with 4 steps per octave; never below the count, never
    above the row, same as the default on powers of two."""
    from dpo_jax.logprobs import max_scored_tokens

    for n in (1, 17, 64, 65, 100, 130, 256, 257, 599):
        mask = np.zeros((2, 601), np.float32)
        mask[1, 1:n + 1] = 1.0
        fine, coarse = max_scored_tokens(mask, steps_per_octave=4), max_scored_tokens(mask)
        assert max(n, 16) <= fine <= coarse <= 600
        assert (fine == coarse) == (n <= 16 or n & (n - 1) == 0 or coarse == 600)
    mask = np.zeros((1, 400), np.float32)
    mask[0, 1:131] = 1.0
    assert (max_scored_tokens(mask), max_scored_tokens(mask, steps_per_octave=4)) == (256, 160)


# ----------------------------------------------------------------------------- limits


def test_unit_longer_than_pack_length_is_refused_naming_the_fix():
    with pytest.raises(ValueError, match="prefix-shared unit.*data.pack_length"):
        helpers.pipeline(_pairs(4), packing=True, pack_length=32, buckets="32",
                         prefix_sharing=True)


def test_grad_accum_refuses_shared_rows():
    model = helpers.tiny_model()
    params = helpers.init_params(model)
    with pytest.raises(ValueError, match="prefix-shared"):
        _one_step(model, params, params, _both(_pairs(8))[1], helpers.loss_config(),
                  helpers.mesh(), StepConfig(grad_accum=2))


def test_truncation_and_bad_rows_decided_before_the_layout():
    """A prompt too long for max_length is cut and a response with nothing to score is a bad
    row, by the tokeniser's rules (which never see the layout); the surviving pairs lay out in
    shared units scoring every token the unshared rows score."""
    from dpo_jax.data.errors import BadRows
    from dpo_jax.data.sources import RawPair
    from dpo_jax.data.testing import gpt2_style_tokenizer
    from dpo_jax.data.tokenize import PairTokenizer

    raw = [RawPair("word " * 40, " yes it is.", " no.", row=0),
           RawPair("Hello there", "", " fine.", row=1),
           RawPair("Question:", " a good answer", " a bad one", row=2)]
    cfg = helpers.data_config(source="generic", tokenizer="unused", on_bad_row="skip",
                              max_length=24, max_prompt_length=12)
    bad = BadRows("skip")
    encoder = PairTokenizer(gpt2_style_tokenizer(), cfg)
    pairs, _ = encoder.encode(raw, bad)
    assert len(pairs) == 2 and sum(bad.counts.values()) == 1
    assert encoder.stats.prompt_truncated == 1
    plain, shared = _both(pairs)
    scored = np.bincount(shared["seq_index"][shared["loss_mask"] > 0], minlength=4)
    np.testing.assert_array_equal(scored, plain["loss_mask"][:, 1:].sum(1))


@pytest.mark.parametrize("field,value", [("task", "sft"), ("task", "reward"),
                                         ("task", "online_dpo"), ("optim.grad_accum", 2)])
def test_config_refuses_prefix_sharing_where_rows_are_read_one_sequence_each(field, value):
    from dpo_jax.config import base_config, read_config

    c = base_config()
    c.data.prefix_sharing = True
    block, _, name = field.rpartition(".")
    (c[block] if block else c)[name] = value
    with pytest.raises(ValueError, match="data.prefix_sharing=False"):
        read_config(c)
    c.data.prefix_sharing = False
    read_config(c)


# ----------------------------------------------------------------------------- whole runs


def _run_pair(tmp_path, make_config):
    """``(summary, final params)`` of the run ``make_config()`` names, without and with
    data.prefix_sharing."""
    from tests import runs

    out = []
    for shared in (False, True):
        c = make_config()
        c.data.prefix_sharing = shared
        summary = runs.run(c, tmp_path / f"shared_{shared}")
        out.append((summary, runs.final_params(c, tmp_path / f"shared_{shared}")))
    return out


def _assert_same_run(got, rtol):
    (s0, p0), (s1, p1) = got
    for k, v in s0["final_eval"].items():
        assert s1["final_eval"][k] == pytest.approx(v, rel=rtol, abs=rtol), k
    assert _rel(p1, p0) < rtol


@pytest.mark.slow  # a whole run; the step itself is tested fast
def test_a_tiny_dpo_run_with_precomputed_reference_ends_with_the_same_parameters(tmp_path):
    """train_and_evaluate end to end (stored reference log-probs, eval): the same final eval
    metrics and parameters with and without prefix sharing."""
    from tests import runs

    def config():
        c = runs.dpo_config(steps=3)
        c.logprobs.precompute_reference = True
        return c

    _assert_same_run(_run_pair(tmp_path, config), rtol=1e-5)


@pytest.mark.slow
def test_offline_default_quick_run_gives_the_same_eval(tmp_path):
    """configs/default.py:quick (60 steps): eval metrics and final parameters within float32
    reassociation (measured: eval loss 0.21834528 unshared, 0.21834531 shared)."""
    module = helpers.load_module("configs/default.py", "default_config")
    _assert_same_run(_run_pair(tmp_path, lambda: module.get_config("quick")), rtol=1e-4)


@pytest.mark.parametrize("fmt,loss", [("ranked", "plackett_luce"), ("unpaired", "kto")])
def test_config_accepts_prefix_sharing_for_ranked_lists_and_unpaired_examples(fmt, loss):
    """Their pipelines lay each prompt out once with its K responses (tests/test_ranked_data.py
    checks the step equals the unshared layout's)."""
    from dpo_jax.config import base_config, read_config

    c = base_config()
    c.data.update(prefix_sharing=True, format=fmt)
    c.loss.name = loss
    assert read_config(c).data.prefix_sharing
