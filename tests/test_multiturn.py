"""The synthetic multi-turn task (``synthetic.make_conversations``, issue 31 item 5): its known
per-turn reward orders chosen over rejected, its preference trees (``data.source='synthetic'``,
``data.format='trees'``) are well formed and score what the same branch points unrolled into
pairs score, and its one-pair-per-conversation forms (``conversation_pairs``) are the final
turn / the whole conversations; the experiment (experiments/trees/multiturn.py) end to end at a
tiny size (slow)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.data import config as data_config
from dpo_jax.data import loading, synthetic, tree_data, trees
from dpo_jax.logprobs import LogprobConfig
from dpo_jax.models import Model, preset
from dpo_jax.step import StepConfig
from tests import helpers

jax.config.update("jax_default_matmul_precision", "highest")

TASK = synthetic.SyntheticTask(prompt_len=(2, 4), response_len=(4, 8))


def _liked_fraction(tokens, topic, turn, shift, num_topics=4, first_content=5):
    """The per-turn reward written out again: content tokens whose residue is the topic's class
    moved by ``turn * shift``."""
    content = [int(c) for c in tokens if c >= first_content]
    want = (topic - 1 + turn * shift) % num_topics
    return sum(c % num_topics == want for c in content) / len(content)


@pytest.mark.parametrize("shift", [0, 1])
def test_the_known_reward_orders_chosen_over_rejected_at_every_turn(shift):
    convs = synthetic.make_conversations(TASK, 40, seed=3, turns=4, turn_shift=shift)
    assert len(convs) == 40
    for conv in convs:
        assert conv["rewards"].shape == (4, 2)
        for t in range(4):
            user, topic = conv["users"][t], conv["topics"][t]
            assert user[0] == topic and 1 <= topic <= 4 and 3 <= len(user) <= 5
            assert (user[1:] >= TASK.first_content).all()
            rc = _liked_fraction(conv["chosen"][t], topic, t, shift)
            rr = _liked_fraction(conv["rejected"][t], topic, t, shift)
            assert conv["rewards"][t].tolist() == pytest.approx([rc, rr])
            assert rc - rr >= TASK.min_gap - 1e-9
            for side in ("chosen", "rejected"):
                r = conv[side][t]
                assert 4 <= len(r) <= 8 and (r >= TASK.first_content).all()  # no EOS inside
    again = synthetic.make_conversations(TASK, 40, seed=3, turns=4, turn_shift=shift)
    assert all(np.array_equal(a["chosen"][2], b["chosen"][2]) for a, b in zip(convs, again))
    other = synthetic.make_conversations(TASK, 40, seed=4, turns=4, turn_shift=shift)
    assert not all(np.array_equal(a["users"][0], b["users"][0]) for a, b in zip(convs, other))


def test_turn_shift_moves_the_liked_class():
    """With turn_shift 1 a response liked at turn 0 under topic k is, token for token, liked
    at turn 1 under topic k - 1: the turn index (the history) decides the preference."""
    liked = np.asarray([5 + 4 * i + 1 for i in range(6)])  # residue 2: topic 3 at turn 0
    assert synthetic.turn_reward(TASK, 3, 0, liked, 1) == 1.0
    assert synthetic.turn_reward(TASK, 3, 1, liked, 1) == 0.0
    assert synthetic.turn_reward(TASK, 2, 1, liked, 1) == 1.0
    assert synthetic.turn_reward(TASK, 3, 1, liked, 0) == 1.0


def _cfg(**fields):
    c = data_config.default_data_config()
    c.synthetic.update(turns=3, prompt_len=(2, 4), response_len=(4, 8), num_train=24,
                       num_eval=8)
    c.update_from_flattened_dict(fields)
    return c


def test_synthetic_trees_are_the_conversations_branch_points():
    """data.source='synthetic' + format='trees': one tree per conversation, a branch point per
    turn (depth = turn, weight = tree_depth_decay ** depth), history = earlier user and chosen
    turns then this user turn, responses = chosen / rejected with EOS; the next history extends
    this one by the chosen turn. Train and eval come from different seeds (no overlap)."""
    cfg = _cfg(format="trees", tree_depth_decay=0.5)
    items, stats = loading.load_tokenised_items(cfg, "train")
    convs = synthetic.make_conversations(TASK, 24, seed=0, turns=3)
    assert len(items) == 24 and stats["bad_rows_skipped"] == {}
    for item, conv in zip(items, convs):
        bps = item["branch_points"]
        assert [bp.depth for bp in bps] == [0, 1, 2]
        assert [bp.weight for bp in bps] == [1.0, 0.5, 0.25]
        for t, bp in enumerate(bps):
            want = np.concatenate([x for s in range(t) for x in (conv["users"][s],
                                                                 conv["chosen"][s])]
                                  + [conv["users"][t]])
            np.testing.assert_array_equal(bp.history, want)
            np.testing.assert_array_equal(bp.responses[0], np.append(conv["chosen"][t], 0))
            np.testing.assert_array_equal(bp.responses[1], np.append(conv["rejected"][t], 0))
            assert bp.ranks == [0, 1]
            if t + 1 < 3:
                np.testing.assert_array_equal(
                    bps[t + 1].history[:len(bp.history) + len(conv["chosen"][t])],
                    np.concatenate([bp.history, conv["chosen"][t]]))
    _, eval_stats = loading.load_tokenised_items(cfg, "eval")
    assert eval_stats["eval_pairs_in_train"] == 0
    pipe = loading.build_pipeline(cfg, split="train", global_batch_size=4)
    assert isinstance(pipe, tree_data.TreePipeline) and pipe.max_bp == 3
    assert pipe.stats["tree_columns"] < pipe.stats["unrolled_columns"]


def test_conversation_pairs_are_the_last_turn_and_the_whole_conversations():
    conv = synthetic.make_conversations(TASK, 1, seed=5, turns=3)[0]
    bps = synthetic.conversation_branch_points(conv)
    last = synthetic.conversation_pair(conv, "last_turn")
    np.testing.assert_array_equal(last["prompt"], bps[2]["history"])
    np.testing.assert_array_equal(last["chosen"], bps[2]["responses"][0])
    np.testing.assert_array_equal(last["rejected"], bps[2]["responses"][1])
    whole = synthetic.conversation_pair(conv, "whole")
    np.testing.assert_array_equal(whole["prompt"], conv["users"][0])
    for side in ("chosen", "rejected"):
        want = np.concatenate([conv[side][0], conv["users"][1], conv[side][1], conv["users"][2],
                               conv[side][2], [0]])
        np.testing.assert_array_equal(whole[side], want)
    with pytest.raises(ValueError, match="last_turn"):
        synthetic.conversation_pair(conv, "first")
    pairs, _ = loading.load_tokenised_pairs(_cfg(**{"synthetic.conversation_pairs": "whole"}),
                                            "train")
    assert len(pairs) == 24
    np.testing.assert_array_equal(pairs[3]["chosen"], synthetic.conversation_pair(
        synthetic.make_conversations(TASK, 24, seed=0, turns=3)[3], "whole")["chosen"])


def _first_batch_and_pairs():
    """The first packed eval batch of 4 synthetic trees and its 12 branch points as pairs."""
    cfg = _cfg(format="trees", packing=True, buckets="128", row_multiple=1)
    pipe = loading.build_pipeline(cfg, split="eval", global_batch_size=4)
    batch = pipe.batch_at(0, 0)
    bps = [bp for i in pipe.batch_items(0, 0)[0] for bp in pipe.items_of(int(i))]
    assert len(bps) == batch["pair_weight"].shape[0] == 12
    assert batch["segment_ids"].max() >= 2  # packed: several trees in a row
    return batch, [{"prompt": bp.history, "chosen": bp.responses[0],
                    "rejected": bp.responses[1]} for bp in bps]


def test_synthetic_trees_see_exactly_the_unrolled_histories():
    """Every scored token of the packed synthetic trees is predicted from a column that sees,
    under the tree mask, exactly the (position, token) keys of its unrolled pair sequence
    before it, and every slot scores its response's tokens in order: the trees are well
    formed and score what the unrolled pairs score."""
    from tests.test_trees import assert_sees_unrolled_histories

    batch, pairs = _first_batch_and_pairs()
    assert_sees_unrolled_histories(batch, pairs)


@pytest.mark.slow
def test_synthetic_tree_logps_and_gradient_match_the_unrolled_pairs():
    """The synthetic trees through the tree pipeline score, per branch point, the log-prob
    sums, counts and vector-Jacobian product of the same branch points unrolled into pairs
    with their full histories (the pair pipeline). Slow (two programs compiled with their
    gradient); tests/test_trees.py holds the same on every model family."""
    batch, pairs = _first_batch_and_pairs()
    B = len(pairs)
    model = Model(preset("tiny-gpt2"))
    params = helpers.init_params(model)
    step_cfg = StepConfig(logprobs=LogprobConfig(scored_only=True, seq_chunk=16))
    cot = jnp.asarray(np.random.default_rng(0).normal(size=2 * B), jnp.float32)
    tree_batch = {k: v for k, v in batch.items() if k not in ("pair_weight", "bp_depth")}
    tree_batch["pair_weight"] = np.ones(B, np.float32)
    lp1, n1, g1 = helpers.logps_and_vjp(model, params, tree_batch, step_cfg, cot)
    lp0, n0, g0 = helpers.logps_and_vjp(model, params, helpers.pair_batch(pairs), step_cfg, cot)
    np.testing.assert_array_equal(n1, n0)
    np.testing.assert_allclose(lp1, lp0, rtol=1e-5, atol=2e-5)
    assert helpers.rel_diff(g1, g0) < 1e-5


@pytest.mark.parametrize("fields, match", [
    ({"synthetic.turns": 0}, "synthetic.turns"),
    ({"synthetic.conversation_pairs": "first"}, "conversation_pairs"),
    ({"format": "ranked", "synthetic.turns": 3}, "data.format"),
    ({"synthetic.from_lists": True}, "from_lists"),
    ({"format": "trees", "source": "hh", "tokenizer": "t"}, "synthetic"),
])
def test_bad_multiturn_settings_name_the_field(fields, match):
    c = _cfg(**fields)
    with pytest.raises(ValueError, match=match):
        data_config.read_data(c)


@pytest.mark.slow
def test_the_experiment_end_to_end_at_a_tiny_size(tmp_path, monkeypatch):
    """experiments/trees/multiturn.py: three methods, one seed, two steps, 2-turn
    conversations: every method trains, every held-out branch point is scored at its depth,
    and the turn-level run moves every depth's margins off the reference's zero."""
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "multiturn", os.path.join(root, "experiments", "trees", "multiturn.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", [
        "multiturn.py", f"--workdir={tmp_path}", "--steps=2", "--seeds=0", "--turns=2",
        "--batch=8", "--num_train=32", "--num_eval=16"])
    mod.main()
    res = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert set(res) == {"s0/turn_level", "s0/last_turn", "s0/whole", "s0/reference"}
    for name, run in res.items():
        assert set(run["eval"]) == {"depth_0", "depth_1"}
        for d in run["eval"].values():
            assert d["branch_points"] == 16 and 0.0 <= d["accuracy"] <= 1.0
        if name != "s0/reference":
            assert run["tokens"] > 0 and run["columns"] >= run["tokens"]
    assert all(d["margin"] == 0.0 for d in res["s0/reference"]["eval"].values())
    assert all(d["margin"] != 0.0 for d in res["s0/turn_level"]["eval"].values())
    assert res["s0/turn_level"]["tokens"] < res["s0/last_turn"]["tokens"]


# ------------------------------------------------------------------ stored reference log-probs


def _tree_run_config(precompute: bool):
    """A tiny DPO run on 2-turn synthetic trees (SGD at the full rate from step 1, so the
    rewards move at once; as tests/test_reference.py)."""
    from tests import runs

    c = runs.dpo_config(steps=2, batch_size=8, eval_batch_size=8, eval_every=2)
    c.update_from_flattened_dict({
        "data.format": "trees", "data.buckets": "64", "data.synthetic.turns": 2,
        "data.synthetic.prompt_len": (2, 4), "data.synthetic.response_len": (4, 8),
        "data.synthetic.num_train": 32, "data.synthetic.num_eval": 16,
        "logprobs.precompute_reference": precompute, "optim.name": "sgd", "optim.lr": 1.0,
        "optim.warmup_steps": 0})
    return c


@pytest.mark.slow  # two whole runs (10 min on the loaded 2-core CPU); the step is tested fast
def test_precomputed_reference_on_trees_gives_the_live_trajectory(tmp_path):
    """logprobs.precompute_reference with data.format='trees': the reference log-probs are
    stored once (the branch points unrolled into pairs) and the run's train and per-depth eval
    metrics and final parameters equal those of the run with the live reference forward."""
    import glob
    import os

    from dpo_jax import reference
    from tests import runs

    live, pre = _tree_run_config(False), _tree_run_config(True)
    s_live = runs.run(live, tmp_path / "live")
    s_pre = runs.run(pre, tmp_path / "pre")
    assert len(glob.glob(os.path.join(tmp_path / "pre", reference.SUBDIR, "*.npz"))) == 1
    assert glob.glob(os.path.join(tmp_path / "live", reference.SUBDIR, "*.npz")) == []
    want, got = runs.records(tmp_path / "live"), runs.records(tmp_path / "pre")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    train = [r for r in want if "loss" in r]
    assert len(train) == 2
    for w, g in zip(want, got):
        for k in ("loss", "rewards/margins", "rewards/chosen"):
            if k in w:
                assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-5), (w["step"], k)
    # step 1 reads policy = reference: rewards 0 in both runs, so stored log-probs in another
    # order than the branch points (or of other sequences) would differ by whole log-probs
    assert train[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert train[-1]["rewards/chosen"] != pytest.approx(0.0, abs=1e-5)
    for k in ("loss", "rewards/margins", "depth_0/rewards/margins", "depth_1/rewards/margins",
              "depth_1/branch_points"):
        assert s_pre["final_eval"][k] == pytest.approx(s_live["final_eval"][k], rel=1e-4,
                                                       abs=1e-5), k
    for g, w in zip(helpers.leaves(runs.final_params(pre, tmp_path / "pre")),
                    helpers.leaves(runs.final_params(live, tmp_path / "live")), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_config_allows_stored_reference_for_binary_trees_only():
    from dpo_jax.config import base_config, read_config

    c = base_config()
    c.data.format = "trees"
    c.logprobs.precompute_reference = True
    assert read_config(c).precompute_reference
    c.data.tree_responses, c.loss.name = 3, "plackett_luce"
    with pytest.raises(ValueError, match="precompute_reference"):
        read_config(c)
    with pytest.raises(ValueError, match="only binary"):
        tree_data.unrolled_pairs([{"branch_points": [trees.BranchPoint(
            np.ones(2, np.int32), [np.ones(1, np.int32)] * 3)]}])
