"""The paper's IMDb experiment as one resumable pipeline: ``configs/imdb.py`` names
:func:`run_pipeline` as its task.

Stages, each caching its output under the workdir and skipped when that output exists
(training stages also resume from their own checkpoints when interrupted):

  tokenizer -> reward -> sft_data -> sft -> prefixes -> samples (k per train prefix from the
  SFT model) -> pairs (reward-labelled, ties dropped) -> runs (DPO per beta, Preferred-FT,
  Unlikelihood; each initialised from SFT) -> reward model (Bradley-Terry on the same pairs,
  prompts split into train/held-out) -> PPO runs (learned reward, one per target KL) and PPO-GT
  runs (the ground-truth reward) -> frontier (every checkpoint of every run: sample held-out
  TEST prefixes, mean reward, sequence KL(pi || pi_SFT), the samples' perplexity under SFT;
  SFT itself and Best-of-N of SFT samples; the real reviews' continuations' perplexity under
  SFT, ``real_fluency.json``) -> frontier.csv + frontier.png; ``compute.json`` (wall time and tokens per method).

The stages are functions of an :class:`~dpo_jax.proj.imdb.experiment.Experiment` in
``stages`` (data), ``runs`` (training) and ``evaluate`` (frontier, compute); this module runs
them in order through :class:`StageRunner`.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Callable

import ml_collections
from absl import logging

from dpo_jax import workdir as workdir_lib
from dpo_jax.proj.imdb import evaluate, runs, stages
from dpo_jax.proj.imdb.experiment import Experiment


def _done(path: pathlib.Path) -> bool:
    """A stage output counts when it exists; a run's ``summary.json`` only when the run
    finished (a preempted run writes one too, with ``finished: false``)."""
    if path.name != workdir_lib.SUMMARY or not path.exists():
        return path.exists()
    try:
        workdir_lib.finished_summary(str(path.parent))
    except workdir_lib.RunStopped:
        return False
    return True


@dataclasses.dataclass
class StageRunner:
    """Runs named stages, each skipped when all its output files exist; records which ran and
    which were skipped, and the wall seconds of every stage ever run in ``workdir``
    (``stage_times.json``, kept across reruns)."""

    workdir: pathlib.Path
    ran: list[str] = dataclasses.field(default_factory=list)
    skipped: list[str] = dataclasses.field(default_factory=list)
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def open(cls, workdir: pathlib.Path) -> "StageRunner":
        times = workdir / "stage_times.json"
        return cls(workdir, seconds=json.loads(times.read_text()) if times.exists() else {})

    def __call__(self, name: str, outputs: list[pathlib.Path], fn: Callable[..., Any],
                 *args: Any) -> None:
        """``fn(*args)`` unless every path in ``outputs`` exists (a run's ``summary.json``:
        exists and says finished). Raises RuntimeError when ``fn`` returns without writing all
        of ``outputs`` (a stage must write what it promises, or a rerun would redo it
        forever), and :class:`~dpo_jax.workdir.RunStopped` when a training stage was stopped
        by SIGTERM before its last step (its checkpoint is kept; a rerun resumes it)."""
        if all(_done(p) for p in outputs):
            logging.info("imdb stage %s: cached (%s)", name, outputs[0])
            self.skipped.append(name)
            return
        t0 = time.time()
        fn(*args)
        for p in outputs:  # a training stage stopped by SIGTERM: nothing after it may run
            if p.name == workdir_lib.SUMMARY and p.exists():
                workdir_lib.finished_summary(str(p.parent))
        missing = [str(p) for p in outputs if not p.exists()]
        if missing:
            raise RuntimeError(f"imdb stage {name} did not write {missing}")
        self.seconds[name] = round(time.time() - t0, 1)
        logging.info("imdb stage %s: done in %.1fs", name, self.seconds[name])
        self.ran.append(name)
        tmp = self.workdir / "stage_times.json.tmp"
        tmp.write_text(json.dumps(self.seconds, indent=2))
        tmp.replace(self.workdir / "stage_times.json")


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Every stage in order (finished ones skipped); returns and writes
    ``pipeline_summary.json``: ``finished``, ``stages_run``, ``stages_skipped`` and the
    ``frontier`` points. A training stage stopped by SIGTERM ends the pipeline there: the
    returned summary has ``finished: false`` and ``stopped`` (which run, at which step), and
    rerunning the same command resumes that stage from its checkpoint."""
    d = pathlib.Path(workdir)
    d.mkdir(parents=True, exist_ok=True)
    stage = StageRunner.open(d)
    try:
        return _run_stages(config, d, stage)
    except workdir_lib.RunStopped as e:
        logging.warning("imdb pipeline stopped: %s", e)
        return {"finished": False, "stopped": str(e), "stages_run": stage.ran,
                "stages_skipped": stage.skipped}


def _run_stages(config: ml_collections.ConfigDict, d: pathlib.Path,
                stage: StageRunner) -> dict[str, Any]:
    exp, c = Experiment(config, d), config.imdb
    if not c.tokenizer:
        stage("tokenizer", [d / "tokenizer" / "tokenizer.json"], stages.build_tokenizer, exp)
    if not (c.reward_dir or c.hub_reward):
        stage("reward", [d / "reward" / "sentiment.npz"], stages.build_reward, exp)
    stage("sft_data", [d / "sft_data" / "train.jsonl.gz"], stages.build_sft_data, exp)
    stage("sft", [d / "sft" / "summary.json"], runs.train_sft, exp)
    stage("prefixes", [d / "prefixes_train.jsonl", d / "prefixes_test.jsonl"],
          stages.build_prefixes, exp)
    stage("samples", [d / "samples_train.jsonl"], stages.sample_train, exp)
    stage("pairs", [d / "pairs.jsonl"], stages.build_pairs, exp)

    variants = runs.variants(exp)
    variants.update(runs.online_variants(exp))
    ppo = runs.ppo_variants(exp)
    if ppo:
        stage("rm_pairs", [d / "rm_pairs" / "train.jsonl", d / "rm_pairs" / "test.jsonl"],
              stages.build_rm_pairs, exp)
        if any(method == "ppo" for method, _, _ in ppo.values()):
            stage("reward_model", [d / "reward_model" / "summary.json"],
                  runs.train_reward_model, exp)
    variants.update(ppo)
    for name, (method, setting, cfg) in variants.items():
        stage(f"train:{name}", [d / "runs" / name / "summary.json"],
              runs.train_variant, exp, name, method, cfg)
        stage(f"frontier:{name}", [d / "runs" / name / "frontier_points.jsonl"],
              evaluate.frontier_points, exp, name, method, setting)
    stage("frontier:sft", [d / "sft_frontier_points.jsonl", d / "real_fluency.json"],
          evaluate.sft_and_best_of_n, exp)

    # Always re-assembled (cheap: it reads the per-run point files), so the CSV and plot hold
    # exactly the configured variants, also when a rerun adds a beta.
    points = evaluate.write_frontier(exp, list(variants))
    evaluate.write_compute(exp, variants, stage.seconds)
    evaluate.log_frontier_to_wandb(config, d)
    stage.ran.append("frontier")
    summary = {"finished": True, "stages_run": stage.ran, "stages_skipped": stage.skipped,
               "frontier": points, "real_fluency": json.loads((d / "real_fluency.json").read_text())}
    (d / "pipeline_summary.json").write_text(json.dumps(summary, indent=2))
    return summary
