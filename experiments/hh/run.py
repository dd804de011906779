"""DPO on real HH dialogues with SmolLM2-135M-Instruct, end to end, and its measurements.

    python experiments/hh/run.py --workdir=runs/hh            # the experiment (configs/hh.py)
    python experiments/hh/run.py --workdir=runs/hh_smoke --smoke   # 3 steps: the pipeline works

Stages, each ``python -m dpo_jax.main`` in its own process (a finished stage is skipped on a
rerun; an interrupted one resumes):

1. ``WORKDIR/reward``: the Bradley-Terry reward model (``configs/hh.py:smollm2,reward``) from the
   same checkpoint on the DPO run's training split;
2. ``WORKDIR/dpo``: DPO (``configs/hh.py:smollm2``) judged by that reward model
   (``eval.judge``): held-out preference metrics, samples of held-out prompts and the win rate
   of the policy's samples against the starting model's at every evaluation;
3. ``WORKDIR/report.json`` and ``WORKDIR/report.md``, read from the stages' ``metrics.jsonl``,
   ``samples.jsonl`` and ``summary.json`` (:func:`report`): held-out accuracy and margins over
   training, chosen and rejected log-probs over training (train batches and held out), samples
   before and after, the final win rate with its standard error, the reward model's held-out
   accuracy, and wall time per step and tokens/s (medians over steps that ran no evaluation,
   checkpoint or compilation).

Extra ``--config.X=V`` arguments go to both stages (e.g. ``--config.train.steps=100``).
Nothing is downloaded: the model comes from ``$DPO_JAX_MODELS`` (default ``~/.cache/dpo_jax``,
written by ``../shared/models/smollm2.sh``), the data from ``$DPO_JAX_DATA``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from dpo_jax.metrics import read_records  # noqa: E402  (after the path, as a script)
from dpo_jax.workdir import finished_summary  # noqa: E402


def run_stage(variants: str, workdir: str, extra: list[str]) -> dict:
    """``python -m dpo_jax.main --config=configs/hh.py:VARIANTS --workdir=WORKDIR EXTRA``; its
    summary. Raises CalledProcessError when the stage fails and RunStopped when it was stopped
    (SIGTERM) before its last step."""
    cmd = [sys.executable, "-m", "dpo_jax.main", f"--config={REPO}/configs/hh.py:{variants}",
           f"--workdir={workdir}", *extra]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    return finished_summary(workdir)  # RunStopped when SIGTERM stopped it: rerun resumes


def steady_step_times(records: list[dict], eval_every: int) -> dict[str, float]:
    """Median ``iteration_s`` and ``tokens_per_s`` of train records whose window holds no
    evaluation (the step after an eval step carries its time) and is past the first two steps
    (compilation); ``n`` the records used. Needs ``train.log_every=1`` for single steps;
    otherwise window means."""
    train = [r for r in records if "loss" in r and "iteration_s" in r]
    steps = [r["step"] for r in train]
    keep = []
    for i, r in enumerate(train):
        lo = steps[i - 1] + 1 if i else 1
        evals = eval_every and any((s - 1) % eval_every == 0 and s > 1
                                   for s in range(lo, r["step"] + 1))
        if lo > 2 and not evals:
            keep.append(r)
    if not keep:
        return {"n": 0}
    return {"n": len(keep), "step_s": statistics.median(r["iteration_s"] for r in keep),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in keep)}


def report(workdir: str, samples_shown: int = 4) -> dict:
    """The measurements of a finished ``WORKDIR`` (see the module docstring), also written to
    ``report.json`` and ``report.md`` there."""
    dpo, rm = os.path.join(workdir, "dpo"), os.path.join(workdir, "reward")
    with open(os.path.join(dpo, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(dpo, "summary.json")) as f:
        summary = json.load(f)
    recs = read_records(os.path.join(dpo, "metrics.jsonl"))
    train_keys = ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen",
                  "logps/rejected", "grad_norm", "lr")
    train = [{"step": r["step"], **{k: r[k] for k in train_keys if k in r}}
             for r in recs if "loss" in r]
    held = [{"step": r["step"], **{k[5:]: v for k, v in r.items() if k.startswith("eval/")}}
            for r in recs if any(k.startswith("eval/") for k in r)]
    samples = read_records(os.path.join(dpo, "samples.jsonl"))
    last = max((s["step"] for s in samples if s["model"] == "policy"), default=None)
    before = [s for s in samples if s["model"] == "reference"]
    after = [s for s in samples if s["model"] == "policy" and s["step"] == last]
    rm_recs = read_records(os.path.join(rm, "metrics.jsonl"))
    rm_eval = [{k[5:]: v for k, v in r.items() if k.startswith("eval/")} | {"step": r["step"]}
               for r in rm_recs if any(k.startswith("eval/") for k in r)]
    final = held[-1] if held else {}
    out = {
        "config": {"model": cfg["model"]["hf_path"].rsplit("/", 1)[-1],
                   "steps": cfg["train"]["steps"], "batch_pairs": cfg["train"]["batch_size"],
                   "beta": cfg["loss"]["beta"], "lr": cfg["optim"]["lr"],
                   "schedule": cfg["optim"]["schedule"],
                   "max_length": cfg["data"]["max_length"],
                   "holdout": summary.get("data", {}).get("eval", {}).get("split", {})
                   .get("holdout")},
        "held_out": held,
        "train": train,
        # on the same held-out pairs: rewards/X = beta * (log pi(X) - log pi_ref(X)) < 0 means
        # X's log-prob fell (train records are different batches each step: not comparable)
        "logps_fall": None if "rewards/chosen" not in final else {
            side: final[f"rewards/{side}"] < 0 for side in ("chosen", "rejected")},
        "win_rate": None if "win_rate" not in final else {
            "step": final["step"], "win_rate": final["win_rate"], "se": final["win_rate_se"],
            "prompts": len(after), "policy_reward": final.get("samples/reward"),
            "reference_reward": final.get("samples/reference_reward")},
        "reward_model_held_out": rm_eval[-1] if rm_eval else None,
        "timing": {**steady_step_times(recs, cfg["train"]["eval_every"]),
                   "compile_s": summary.get("compile_s"), "wall_s": summary.get("wall_s")},
        "samples": [{"prompt": b["prompt"], "before": b["completion"],
                     "after": a["completion"], "reward_before": b.get("reward"),
                     "reward_after": a.get("reward")}
                    for b, a in zip(before, after)][:samples_shown],
    }
    with open(os.path.join(workdir, "report.json"), "w") as f:
        json.dump(out, f, indent=1)
    with open(os.path.join(workdir, "report.md"), "w") as f:
        f.write(markdown(out))
    return out


def _fmt(x) -> str:
    return "-" if x is None else (f"{x:.4f}" if isinstance(x, float) else str(x))


def markdown(r: dict) -> str:
    """``report``'s tables as markdown (the experiment README's format)."""
    lines = [f"config: {json.dumps(r['config'])}", "",
             "| step | held-out acc | margin | logps/chosen | logps/rejected | win rate ± se |",
             "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for h in r["held_out"]:
        win = ("-" if "win_rate" not in h
               else f"{h['win_rate']:.3f} ± {h['win_rate_se']:.3f}")
        lines.append(f"| {h['step']} | {_fmt(h.get('rewards/accuracies'))} | "
                     f"{_fmt(h.get('rewards/margins'))} | {_fmt(h.get('logps/chosen'))} | "
                     f"{_fmt(h.get('logps/rejected'))} | {win} |")
    lines += ["", "| step | loss | acc | margin | logps/chosen | logps/rejected |",
              "| ---: | ---: | ---: | ---: | ---: | ---: |"]
    for t in r["train"]:
        lines.append(f"| {t['step']} | {_fmt(t.get('loss'))} | "
                     f"{_fmt(t.get('rewards/accuracies'))} | {_fmt(t.get('rewards/margins'))} | "
                     f"{_fmt(t.get('logps/chosen'))} | {_fmt(t.get('logps/rejected'))} |")
    lines += ["", f"held-out logps fell vs the reference (last eval): {r['logps_fall']}",
              f"win rate: {json.dumps(r['win_rate'])}",
              f"reward model held out: {json.dumps(r['reward_model_held_out'])}",
              f"timing: {json.dumps(r['timing'])}", ""]
    for s in r["samples"]:
        lines += [f"**prompt** {s['prompt'][-300:]!r}", "",
                  f"* before ({_fmt(s['reward_before'])}): {s['before']!r}",
                  f"* after ({_fmt(s['reward_after'])}): {s['after']!r}", ""]
    return "\n".join(lines) + "\n"


def stage_args(argv, doc: str):
    """``(args, extra)`` of an experiment script's command line: ``--workdir`` (required),
    ``--smoke``, ``--report_only``, and ``--config.X=V`` overrides passed on to every stage
    (anything else is an error)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--smoke", action="store_true", help="3 steps of each stage")
    ap.add_argument("--report_only", action="store_true")
    args, extra = ap.parse_known_args(argv)
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
        ap.error(f"unknown arguments {bad} (only --config.X=V overrides are passed on)")
    return args, extra


def main(argv=None) -> dict:
    args, extra = stage_args(argv, __doc__)
    workdir = os.path.abspath(args.workdir)
    smoke = ",smoke" if args.smoke else ""
    if not args.report_only:
        run_stage(f"smollm2,reward{smoke}", os.path.join(workdir, "reward"), extra)
        run_stage(f"smollm2{smoke}", os.path.join(workdir, "dpo"),
                  [f"--config.eval.judge={os.path.join(workdir, 'reward')}", *extra])
    out = report(workdir)
    print(markdown(out))
    return out


if __name__ == "__main__":
    main()
