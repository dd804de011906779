"""The IMDb pipeline (`configs/imdb.py:tiny`) end to end through every stage; a rerun skips them."""

import importlib.util
import json
import pathlib
import time

import numpy as np
import pytest

from dpo_jax.tasks import get_task
from tests._imdb_common import synthetic_reviews

REPO = pathlib.Path(__file__).resolve().parents[1]


def _write_shards(root: pathlib.Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir()
    for split, n, seed in (("train", 48, 0), ("test", 24, 1), ("unsup", 16, 2)):
        texts, labels = synthetic_reviews(n, seed)
        if split == "unsup":
            labels = np.full(n, -1)
        pq.write_table(pa.table({"text": texts, "label": labels.astype(np.int64)}),
                       root / f"{split}-00000-of-00001.parquet")


def _config(data_dir):
    spec = importlib.util.spec_from_file_location("imdb_config", REPO / "configs" / "imdb.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("tiny")
    c.imdb.data_dir = str(data_dir)
    return c


def test_tiny_pipeline_every_stage_then_cached(tmp_path):
    _write_shards(tmp_path / "imdb")
    work = tmp_path / "work"
    summary = get_task("imdb")(_config(tmp_path / "imdb"), str(work))
    expected = ["tokenizer", "reward", "sft_data", "sft", "prefixes", "samples", "pairs",
                "rm_pairs", "reward_model",
                "train:dpo_beta0.1", "frontier:dpo_beta0.1", "train:preferred_ft",
                "frontier:preferred_ft", "train:unlikelihood", "frontier:unlikelihood",
                "train:ppo_kl6", "frontier:ppo_kl6",
                "train:ppo_gt_kl6", "frontier:ppo_gt_kl6", "frontier:sft", "frontier"]
    assert summary["stages_run"] == expected and summary["stages_skipped"] == []
    # Pairs: chosen reward strictly above rejected (ties dropped), at most 6 per prompt.
    pairs = [json.loads(x) for x in open(work / "pairs.jsonl")]
    assert pairs and all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)
    per_prompt = {}
    for p in pairs:
        per_prompt[p["prompt"]] = per_prompt.get(p["prompt"], 0) + 1
    assert max(per_prompt.values()) <= 6
    groups = [json.loads(x) for x in open(work / "samples_train.jsonl")]
    assert len(groups) == 8 and all(len(g["completions"]) == 4 for g in groups)
    # The frontier: SFT at KL ~ 0 (policy == reference exactly), best-of-n at its formula, and
    # one point per run and checkpoint (steps 2).
    points = summary["frontier"]
    methods = {(p["method"], p["setting"], p["step"]) for p in points}
    assert {("dpo", "beta=0.1", 2), ("preferred_ft", "", 2), ("unlikelihood", "", 2),
            ("ppo", "target_kl=6", 2), ("ppo_gt", "target_kl=6", 1), ("ppo_gt", "target_kl=6", 2),
            ("sft", "", 0), ("best_of_n", "n=2", 0), ("best_of_n", "n=4", 0)} == methods
    sft = next(p for p in points if p["method"] == "sft")
    assert abs(sft["kl"]) < 1e-4
    bo4 = next(p for p in points if p["setting"] == "n=4")
    assert bo4["kl"] == pytest.approx(np.log(4) - 0.75)
    sft_rows = [json.loads(x) for x in open(work / "sft_test_samples.jsonl")]
    assert bo4["mean_reward"] >= np.mean([r["reward"] for r in sft_rows]) - 1e-6
    assert (work / "frontier.png").stat().st_size > 0
    # The reward model is held out by prompt; PPO points carry the proxy (reward-model) score.
    rm_train = {json.loads(x)["prompt"] for x in open(work / "rm_pairs" / "train.jsonl")}
    rm_test = {json.loads(x)["prompt"] for x in open(work / "rm_pairs" / "test.jsonl")}
    assert rm_test and rm_train and not rm_train & rm_test
    assert len(rm_train) + len(rm_test) == len(per_prompt)
    rm_summary = json.loads((work / "reward_model" / "summary.json").read_text())
    assert 0.0 <= rm_summary["final_eval"]["accuracy"] <= 1.0
    for name, steps in (("ppo_kl6", [2]), ("ppo_gt_kl6", [1, 2])):  # imdb.ppo_gt: every step
        pts = [json.loads(x) for x in open(work / "runs" / name / "frontier_points.jsonl")]
        assert [p["step"] for p in pts] == steps and np.isfinite(pts[0]["proxy_reward"])
    # PPO-GT trained on the ground-truth reward: its logged rollout rewards are the classifier's
    # scores of its own samples (the same object that scores the frontier).
    ppo_gt = json.loads((work / "runs" / "ppo_gt_kl6" / "config.json").read_text())
    assert ppo_gt["ppo"]["reward"] == "sentiment" and ppo_gt["ppo"]["target_kl"] == 6.0
    assert ppo_gt["ppo"]["kl_horizon"] == 50 and ppo_gt["train"]["checkpoint_every"] == 1
    compute = json.loads((work / "compute.json").read_text())
    assert set(compute["runs"]) == {"dpo_beta0.1", "preferred_ft", "unlikelihood", "ppo_kl6",
                                    "ppo_gt_kl6"}
    ppo_cost = compute["runs"]["ppo_kl6"]
    # 2 iterations x 8 rollouts x (prompt + completion) tokens, 2 epochs: trained = 2 x forward/2
    assert ppo_cost["sampled_tokens"] > 0 and ppo_cost["trained_tokens"] == ppo_cost["forward_tokens"]
    assert ppo_cost["sampled_tokens"] <= 2 * 8 * 6
    assert compute["runs"]["dpo_beta0.1"]["trained_tokens"] > 0
    # Rerun: every stage is cached, nothing is recomputed; only the frontier is re-assembled.
    t0 = time.time()
    again = get_task("imdb")(_config(tmp_path / "imdb"), str(work))
    assert again["stages_run"] == ["frontier"] and again["stages_skipped"] == expected[:-1]
    assert again["frontier"] == points
    assert time.time() - t0 < 20
