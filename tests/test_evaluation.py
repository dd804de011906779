"""Samples and win rates during evaluation (dpo_jax/evaluation.py, the ``eval`` config block)."""

import json
import os

import numpy as np
import pytest

from dpo_jax import evaluation
from dpo_jax.data.synthetic import SyntheticTask, true_reward
from tests import runs


def test_win_rate_counts_ties_half_and_gives_the_binomial_standard_error():
    rate, se = evaluation.win_rate(np.array([2.0, 1.0, 0.5, 0.0]), np.array([1.0, 1.0, 1.0, 1.0]))
    outcomes = np.array([1.0, 0.5, 0.0, 0.0])
    assert rate == pytest.approx(outcomes.mean())
    assert se == pytest.approx(outcomes.std(ddof=1) / 2.0)
    with pytest.raises(ValueError, match="equal non-empty"):
        evaluation.win_rate(np.zeros(3), np.zeros(2))


def test_sample_every_must_be_a_multiple_of_eval_every():
    config = runs.dpo_config(eval_every=3)
    config.eval.sample_every = 4
    with pytest.raises(ValueError, match="multiple of train.eval_every=3"):
        evaluation.read_eval(config)


def _read(path):
    with open(path) as f:
        return [json.loads(x) for x in f if x.strip()]


@pytest.mark.parametrize("task", ["dpo"] + [pytest.param(t, marks=pytest.mark.slow) for t in ("sft", "ppo")])
def test_samples_and_win_rate_are_written_at_sample_points(tmp_path, task):
    config = runs.CONFIGS[task](steps=4, eval_every=2)
    config.eval.update(sample_every=2, sample_prompts=6, max_new_tokens=5, judge="synthetic")
    runs.run(config, tmp_path)
    rows = _read(tmp_path / "samples.jsonl")
    assert [(r["model"], r["step"]) for r in rows] == (
        [("reference", 0)] * 6 + [("policy", 2)] * 6 + [("policy", 4)] * 6)
    task_ = SyntheticTask()
    for r in rows:  # the judge's reward is the synthetic task's true reward of the decoded text
        prompt = np.array(r["prompt"].split(), np.int64)
        completion = np.array(r["completion"].split(), np.int64)
        assert 1 <= len(completion) <= 5
        assert r["reward"] == pytest.approx(true_reward(task_, prompt, completion))
    evals = [r for r in runs.records(tmp_path) if "eval/win_rate" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for rec in evals:
        policy = [r for r in rows if r["step"] == rec["step"]]
        reference = [r for r in rows if r["model"] == "reference"]
        want, se = evaluation.win_rate(np.array([r["reward"] for r in policy]),
                                       np.array([r["reward"] for r in reference]))
        assert rec["eval/win_rate"] == pytest.approx(want)
        assert rec["eval/win_rate_se"] == pytest.approx(se)
        assert rec["eval/samples/reward"] == pytest.approx(np.mean([r["reward"] for r in policy]))
        assert rec["eval/samples/length"] == pytest.approx(
            np.mean([len(r["completion"].split()) for r in policy]))
    assert os.listdir(tmp_path / "tb" / "samples")


@pytest.mark.parametrize("checkpoint_every", [pytest.param(2, marks=pytest.mark.slow), 0])
def test_a_resumed_run_writes_the_samples_of_an_uninterrupted_one(tmp_path, checkpoint_every):
    """Killed after step 3 with the samples of step 2 written (and checkpointed at 2, or not
    checkpointed at all), the rerun redoes what follows its checkpoint: samples.jsonl ends as
    the uninterrupted run's, each step once."""
    config = runs.dpo_config(steps=4, eval_every=2, checkpoint_every=checkpoint_every)
    config.eval.update(sample_every=2, sample_prompts=4, max_new_tokens=4, judge="synthetic")
    runs.run(config, tmp_path / "full")
    summary = runs.cut_and_resume(config, tmp_path / "cut", interrupt_after=3)
    assert summary["resumed_from"] == checkpoint_every
    assert _read(tmp_path / "cut" / "samples.jsonl") == _read(tmp_path / "full" / "samples.jsonl")
