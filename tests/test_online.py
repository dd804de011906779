"""Online and iterative DPO (dpo_jax/online.py, task='online_dpo'): pairs from scored samples,
the pipeline's batch layout, learning against the synthetic task's true reward, exact resume
(online and mid-round iterative), the same run on the three mesh shapes."""

import json

import numpy as np
import pytest

from dpo_jax import online
from dpo_jax.config import base_config
from dpo_jax.data.synthetic import SyntheticTask, true_reward
from tests import helpers as h
from tests import runs


def online_config(steps=4, **train):
    """A 1-layer d_model-32 online DPO run on the synthetic task: 16 prompts per step, 4
    samples of at most 8 tokens each, judged by the true reward."""
    c = runs.tiny(base_config(), steps=steps, **train)
    c.task = "online_dpo"
    c.online = online.default_online_config()
    c.online.update(samples_per_prompt=4, max_new_tokens=8)
    c.optim.warmup_steps = 0
    return c


# ------------------------------------------------------------------ pure parts


def test_pairs_take_the_best_and_worst_sample_and_drop_ties():
    k, rng = 3, np.random.default_rng(0)
    prompts = [rng.integers(5, 128, 4).astype(np.int32) for _ in range(4)]
    completions = [rng.integers(5, 128, 1 + i % 5).astype(np.int32) for i in range(4 * k)]
    scores = rng.random(4 * k)
    scores[3:6] = 0.5  # prompt 1: a tie
    scores[6:9] = [0.2, 0.9, 0.9]  # prompt 2: two best; the first is chosen
    pairs, weight, chosen, rejected = online.preference_pairs(prompts, completions, scores, k)
    assert weight.tolist() == [1.0, 0.0, 1.0, 1.0]
    for i, p in enumerate(pairs):
        s = scores[i * k:(i + 1) * k]
        hi, lo = (int(np.argmax(s)), int(np.argmin(s))) if weight[i] else (0, 1)
        np.testing.assert_array_equal(p["prompt"], prompts[i])
        np.testing.assert_array_equal(p["chosen"], completions[i * k + hi])
        np.testing.assert_array_equal(p["rejected"], completions[i * k + lo])
        assert chosen[i] == pytest.approx(s.max()) and rejected[i] == pytest.approx(s.min())
    with pytest.raises(ValueError, match="11 completions and 11 scores for 4 prompts"):
        online.preference_pairs(prompts, completions[:-1], scores[:-1], k)


def test_pair_tokens_count_the_prompt_before_each_response():
    rng = np.random.default_rng(0)
    pairs = [{"prompt": rng.integers(1, 9, n), "chosen": rng.integers(1, 9, c),
              "rejected": rng.integers(1, 9, r)} for n, c, r in ((3, 2, 4), (1, 5, 0), (7, 1, 1))]
    assert online.pair_tokens(pairs) == (2 * 3 + 2 + 4) + (2 * 1 + 5) + (2 * 7 + 1 + 1)
    assert online.pair_tokens([]) == 0


def test_pair_batch_is_the_pipelines_batch():
    pairs = h.synthetic_pairs(8)
    weight = np.arange(8, dtype=np.float32) % 2
    got = online.pair_batch(pairs, weight, 32, pad_id=0)
    want = h.pair_batch(pairs, buckets="32")
    assert set(got) == set(want)
    for key in want:
        if key != "pair_weight":
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    np.testing.assert_array_equal(got["pair_weight"], weight)


@pytest.mark.parametrize("field,value,message", [
    ("samples_per_prompt", 1, "at least 2 completions"),
    ("iterations", 4, "divisor of train.steps=6"),
    ("temperature", 0.0, "greedy"),
])
def test_bad_online_settings_are_refused(field, value, message):
    c = online_config(steps=6)
    c.online[field] = value
    with pytest.raises(ValueError, match=message):
        online.read_online(c)


# ------------------------------------------------------------------ the task

@pytest.mark.slow
def test_online_dpo_learns_the_true_reward(tmp_path):
    """configs/online_dpo.py:quick against the synthetic task's true reward: held-out DPO
    accuracy well above chance, the policy's samples beat the reference's."""
    c = h.load_module("configs/online_dpo.py").get_config("quick")
    c.train.async_checkpointing = False
    summary = runs.run(c, tmp_path)
    ev = summary["final_eval"]
    assert ev["rewards/accuracies"] >= 0.75, ev
    assert ev["samples/reward"] > ev["samples/reference_reward"], ev
    assert ev["win_rate"] > 0.5, ev
    last = [r for r in runs.records(tmp_path) if "online/reward" in r][-1]
    assert last["online/reward_chosen"] > last["online/reward_rejected"]
    task = SyntheticTask()  # the judge's scores are the true reward of the decoded samples
    for line in open(tmp_path / "samples.jsonl"):
        r = json.loads(line)
        assert r["reward"] == pytest.approx(true_reward(
            task, np.array(r["prompt"].split(), int), np.array(r["completion"].split(), int)))


@pytest.mark.parametrize("iterations", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_online_and_iterative_dpo_resume_exactly(tmp_path, iterations):
    """Killed after step 3 (checkpoint at 2; iterative: rounds of 2 steps, so the resumed run
    is in round 1 and reads its sampling policy back from rounds/1), the rerun ends with the
    uninterrupted run's params and metric log."""
    c = online_config(steps=4, checkpoint_every=2, keep_checkpoints=3)
    c.online.iterations = iterations
    c.data.synthetic.num_train = 48  # 3 prompt batches per epoch: the resumed run crosses one
    full, summary, want = runs.resume_matches_full_run(c, tmp_path, interrupt_after=3,
                                                       resumed_from=2)
    assert summary["online"] == full["online"]
    assert [r["online/round"] for r in want] == ([0, 0, 0, 0] if not iterations else [0, 0, 1, 1])


@pytest.fixture(scope="module")
def data_parallel_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("data8")
    runs.run(online_config(steps=2), workdir)
    return runs.records(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [
    {"data": 1, "fsdp": 8, "tensor": 1},
    {"data": 2, "fsdp": 2, "tensor": 2},
])
def test_the_same_run_on_every_mesh(data_parallel_run, tmp_path, mesh_shape):
    c = online_config(steps=2)
    c.mesh.shape = mesh_shape
    runs.run(c, tmp_path)
    got, want = runs.records(tmp_path), data_parallel_run
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        for key in ("online/reward", "online/ties", "online/length"):
            assert g[key] == w[key], key
        for key in ("loss", "rewards/margins", "objective/kl", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=1e-5, abs=1e-6), key


def test_eval_win_rate_is_judged_by_the_reward_the_run_trains_on(tmp_path):
    """With ``eval.judge=''`` the eval samples are scored by the ``reward_fn`` the run trains
    on (as PPO does): it is called at every train step and for the eval samples (reference
    once, policy at the sample point), each written row's reward is that function recomputed
    here in numpy on the row's decoded tokens, and ``eval/win_rate`` is numpy's from the rows."""
    calls = []

    def multiples_of_three(samples):  # not the synthetic task's reward
        calls.append(samples.tokens_BT.shape[0])
        hit = (samples.tokens_BT % 3 == 0) & (samples.completion_mask_BT > 0)
        return np.sum(np.asarray(hit), axis=1).astype(np.float32)

    c = online_config(steps=2, eval_every=2)
    c.eval.update(sample_every=2, sample_prompts=8, judge="")
    summary = runs.run(c, tmp_path, reward_fn=multiples_of_three)
    assert len(calls) == 2 + 2  # two train steps, the reference's and the policy's samples
    rows = [json.loads(x) for x in open(tmp_path / "samples.jsonl")]
    for r in rows:
        tokens = np.array(r["completion"].split(), int)
        assert r["reward"] == float(np.sum(tokens % 3 == 0)), r
    policy = np.array([r["reward"] for r in rows if r["model"] == "policy"])
    reference = np.array([r["reward"] for r in rows if r["model"] == "reference"])
    assert len(policy) == len(reference) == 8
    ev = summary["final_eval"]
    outcome = np.where(policy > reference, 1.0, np.where(policy == reference, 0.5, 0.0))
    assert ev["win_rate"] == pytest.approx(outcome.mean())
    assert ev["samples/reward"] == pytest.approx(policy.mean())
    assert ev["samples/reference_reward"] == pytest.approx(reference.mean())
