"""The IMDb pipeline (`configs/imdb.py:tiny`) end to end through every stage; a rerun skips them.
Also: the stage runner's cache, the default data source, and that the library never imports
the project."""

import ast
import json
import pathlib

import ml_collections
import numpy as np
import pytest

from dpo_jax.config import read_config
from dpo_jax.evaluation import build_judge
from dpo_jax.ppo.rewards import build_reward
from dpo_jax.proj.imdb.pipeline import StageRunner
from dpo_jax.tasks import get_task
from tests import helpers
from tests._imdb_common import write_shards as _write_shards

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(variant="tiny", data_dir=None):
    c = helpers.load_module("configs/imdb.py", "imdb_config").get_config(variant)
    if data_dir is not None:
        c.imdb.data_dir = str(data_dir)
    return c

@pytest.mark.slow
def test_tiny_pipeline_every_stage_then_cached(tmp_path):
    _write_shards(tmp_path / "imdb")
    work = tmp_path / "work"
    config = _config(data_dir=tmp_path / "imdb")
    assert config.task == "dpo_jax.proj.imdb.pipeline:run_pipeline"
    summary = get_task(config.task)(config, str(work))
    expected = ["tokenizer", "reward", "sft_data", "sft", "prefixes", "samples", "pairs",
                "rm_pairs", "reward_model",
                "train:dpo_beta0.1", "frontier:dpo_beta0.1", "train:preferred_ft",
                "frontier:preferred_ft", "train:unlikelihood", "frontier:unlikelihood",
                "train:online_dpo_beta0.1", "frontier:online_dpo_beta0.1",
                "train:iterative_dpo_beta0.1_r2", "frontier:iterative_dpo_beta0.1_r2",
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
            ("online_dpo", "beta=0.1", 2), ("iterative_dpo", "beta=0.1,rounds=2", 2),
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
    # Its accuracy counts wins over exactly the held-out pairs (padding pairs weigh 0).
    held_out = len(open(work / "rm_pairs" / "test.jsonl").readlines())
    wins = rm_summary["final_eval"]["accuracy"] * held_out
    assert wins == pytest.approx(round(wins), abs=1e-4), (wins, held_out)
    for name, steps in (("ppo_kl6", [2]), ("ppo_gt_kl6", [1, 2])):  # imdb.ppo_gt: every step
        pts = [json.loads(x) for x in open(work / "runs" / name / "frontier_points.jsonl")]
        assert [p["step"] for p in pts] == steps and np.isfinite(pts[0]["proxy_reward"])
    # PPO-GT was given the ground-truth reward object as reward_fn: its config names no reward
    # the library could build, and the controller overrides of imdb.ppo_gt apply.
    ppo_gt = json.loads((work / "runs" / "ppo_gt_kl6" / "config.json").read_text())
    assert ppo_gt["ppo"]["reward"] == "ground_truth" and ppo_gt["ppo"]["target_kl"] == 6.0
    assert ppo_gt["ppo"]["kl_horizon"] == 50 and ppo_gt["train"]["checkpoint_every"] == 1
    with pytest.raises(ValueError, match="reward_fn"):
        build_reward(read_config(ml_collections.ConfigDict(ppo_gt)))
    compute = json.loads((work / "compute.json").read_text())
    assert set(compute["runs"]) == {"dpo_beta0.1", "preferred_ft", "unlikelihood", "ppo_kl6",
                                    "ppo_gt_kl6", "online_dpo_beta0.1",
                                    "iterative_dpo_beta0.1_r2"}
    # Online DPO: judged by the ground-truth reward object (no reward the library could build
    # from the config), 2 steps x 8 prefixes x 2 samples of <= 6 tokens; iterative DPO sampled
    # round 1 from the policy saved when it began.
    for name in ("online_dpo_beta0.1", "iterative_dpo_beta0.1_r2"):
        run_cfg = json.loads((work / "runs" / name / "config.json").read_text())
        assert run_cfg["online"]["reward"] == "ground_truth"
        assert run_cfg["task"] == "online_dpo" and run_cfg["init"]["policy"].endswith("sft")
        cost = compute["runs"][name]
        assert 0 < cost["sampled_tokens"] <= 2 * 8 * 2 * 6
        # each pair: prompt (2-8 tokens) twice and two completions (1-6 tokens each)
        assert 2 * 8 * (2 * 2 + 2) <= cost["trained_tokens"] <= 2 * 8 * (2 * 8 + 2 * 6)
    assert sorted(p.name for p in (work / "runs" / "iterative_dpo_beta0.1_r2" / "rounds")
                  .iterdir()) == ["0", "1"]
    with pytest.raises(ValueError, match="ground_truth"):
        build_judge("ground_truth", read_config(ml_collections.ConfigDict(run_cfg)).data,
                    None, (), 0)
    ppo_cost = compute["runs"]["ppo_kl6"]
    # 2 iterations x 8 rollouts x (prompt + completion) tokens, 2 epochs: trained = 2 x forward/2
    assert ppo_cost["sampled_tokens"] > 0 and ppo_cost["trained_tokens"] == ppo_cost["forward_tokens"]
    assert ppo_cost["sampled_tokens"] <= 2 * 8 * 6
    assert compute["runs"]["dpo_beta0.1"]["trained_tokens"] > 0
    # Rerun: every stage is cached, nothing is recomputed; only the frontier is re-assembled.
    again = get_task(config.task)(_config(data_dir=tmp_path / "imdb"), str(work))
    assert again["stages_run"] == ["frontier"] and again["stages_skipped"] == expected[:-1]
    assert again["frontier"] == points


def test_stage_runner_skips_finished_stages_and_keeps_their_times(tmp_path):
    calls = []

    def write(path, text):
        calls.append(path.name)
        path.write_text(text)

    stage = StageRunner.open(tmp_path)
    stage("a", [tmp_path / "a.txt"], write, tmp_path / "a.txt", "1")
    with pytest.raises(RuntimeError, match="did not write"):
        stage("b", [tmp_path / "b.txt"], lambda: None)
    assert stage.ran == ["a"] and calls == ["a.txt"]
    again = StageRunner.open(tmp_path)  # a rerun: "a" is cached, its time kept
    again("a", [tmp_path / "a.txt"], write, tmp_path / "a.txt", "2")
    assert again.skipped == ["a"] and calls == ["a.txt"]
    assert set(again.seconds) == {"a"} and (tmp_path / "a.txt").read_text() == "1"


def test_a_stage_stopped_by_sigterm_is_not_done_and_stops_the_pipeline(tmp_path):
    """A preempted training run writes summary.json with finished=false: the stage that ran it
    must raise (nothing after it may read the half-trained model) and a rerun must run it
    again (resume), not skip it as cached."""
    from dpo_jax import workdir as workdir_lib

    run = tmp_path / "sft"
    calls = []

    def train(finished):
        calls.append(finished)
        run.mkdir(exist_ok=True)
        (run / "summary.json").write_text(json.dumps(
            {"steps": 150, "finished": finished, "stopped_at": None if finished else 40}))

    stage = StageRunner.open(tmp_path)
    with pytest.raises(workdir_lib.RunStopped, match=r"sft.*step 40 of 150.*rerun"):
        stage("sft", [run / "summary.json"], train, False)
    assert stage.ran == [] and "sft" not in stage.seconds
    again = StageRunner.open(tmp_path)
    again("sft", [run / "summary.json"], train, True)  # not skipped: it resumes and finishes
    assert again.ran == ["sft"] and calls == [False, True]
    third = StageRunner.open(tmp_path)
    third("sft", [run / "summary.json"], train, True)
    assert third.skipped == ["sft"] and calls == [False, True]


def test_default_config_names_no_local_path():
    """The reviews default to the hub (tests/test_imdb_data.py), the paper's tokenizer to the
    model's own."""
    for variant in ("cpu", "gpu", "paper"):
        assert _config(variant).imdb.data_dir == ""
    assert _config("paper").imdb.tokenizer == _config("paper").model.hf_path


def test_library_never_imports_the_project():
    """Only configs name dpo_jax.proj; no module of the library imports it."""
    offenders = []
    for path in sorted((REPO / "dpo_jax").rglob("*.py")):
        if "proj" in path.relative_to(REPO / "dpo_jax").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("dpo_jax.proj")]
    assert offenders == []


@pytest.mark.parametrize("variant", ["tiny", "cpu", "smollm2"])
def test_every_stage_config_of_every_variant_is_accepted(variant, tmp_path, monkeypatch):
    """Each training run the pipeline derives (SFT, reward model, DPO per beta, baselines,
    online, PPO, PPO-GT) passes the checks a task makes before it writes (``check_run``): the
    whole-pipeline tests are slow, and a stage config that a config-reader change refuses would
    otherwise surface only hours into a real run (the SFT stage's data block did)."""
    import jax

    from dpo_jax.data.testing import chatml_tokenizer
    from dpo_jax.models import Model, preset
    from dpo_jax.models.hf import save_hf
    from dpo_jax.models.local import MODELS_ENV, SMOLLM2
    from dpo_jax.proj.imdb import runs
    from dpo_jax.proj.imdb.experiment import Experiment
    from dpo_jax.workdir import check_run, config_changes, config_dict

    tok = chatml_tokenizer()
    if variant == "smollm2":  # a tiny random Llama in place of the real directory
        cfg = preset("tiny-llama", vocab_size=512, max_len=64)
        save_hf(str(tmp_path / "models" / SMOLLM2), cfg, Model(cfg).init(jax.random.key(0)),
                tokenizer=tok)
        monkeypatch.setenv(MODELS_ENV, str(tmp_path / "models"))
    config = _config(variant, data_dir=tmp_path / "imdb")
    work = tmp_path / "work"
    if not config.imdb.tokenizer:  # the tokenizer stage's output
        tok.save_pretrained(str(work / "tokenizer"))
    exp = Experiment(config, work)
    derived = {"sft": runs.sft_config(exp), "reward_model": runs.reward_model_config(exp)}
    for group in (runs.variants(exp), runs.online_variants(exp), runs.ppo_variants(exp)):
        derived.update({name: cfg for name, (_, _, cfg) in group.items()})
    assert len(derived) >= 6
    for name, cfg in derived.items():
        try:
            check_run(cfg)
        except ValueError as e:
            raise AssertionError(f"imdb:{variant} stage {name}: {e}") from e
    # A run's workdir refuses a rerun whose config changes: the experiment's own block stays
    # out of every run config, so a new beta or PPO setting reuses the finished SFT stage.
    assert all("imdb" not in cfg for cfg in derived.values())
    config.imdb.betas = (0.3,)
    config.imdb.ppo_target_kls = ()
    config.imdb.runs.steps = 7
    again = runs.sft_config(Experiment(config, work))
    assert config_changes(config_dict(derived["sft"]), config_dict(again)) == {}


@pytest.mark.parametrize("summary,error", [
    ({"steps": 5, "finished": True, "stopped_at": None}, None),
    ({"steps": 5}, None),  # a summary from before the field: read as it is
    ({"steps": 5, "finished": False, "stopped_at": 3}, r"step 3 of 5.*rerun"),
    (None, "summary.json"),  # no summary: the run never ended a step loop
])
def test_finished_summary_is_the_check_every_chain_of_runs_shares(tmp_path, summary, error):
    """workdir.finished_summary (the IMDb stages, experiments/hh/run.py, the loss sweep and the
    ranked runs call it): a finished run's summary, RunStopped naming the step of a stopped one,
    FileNotFoundError without one."""
    from dpo_jax import workdir as workdir_lib

    if summary is not None:
        (tmp_path / "summary.json").write_text(json.dumps(summary))
    if error is None:
        assert workdir_lib.finished_summary(str(tmp_path)) == summary
    else:
        kind = workdir_lib.RunStopped if summary else FileNotFoundError
        with pytest.raises(kind, match=error):
            workdir_lib.finished_summary(str(tmp_path))
