"""Likelihood displacement on HH with and without the CHES filter (issue 34; Razin et al. 2024).

    python experiments/hh/displacement.py --workdir=runs/hh_ld          # both runs + report
    python experiments/hh/displacement.py --workdir=runs/hh_ld_smoke --smoke   # 3 steps each

Stages, each ``python -m dpo_jax.main`` in its own process (``run.py``'s ``run_stage``: a
finished stage is skipped on a rerun, an interrupted one resumes):

1. ``WORKDIR/dpo``: ``configs/hh.py:smollm2,displacement`` (per-pair diagnostics on);
2. ``WORKDIR/dpo_ches``: the same with ``ches_filter`` (the train pairs of highest ln-CHES under
   the starting model dropped), at equal steps;
   ``WORKDIR/dpo_random``: the control, ``ches_random`` (as many pairs dropped at random);
3. ``python -m dpo_jax.inspect`` of each (``WORKDIR/<stage>/inspect/``) and
   ``WORKDIR/report.md`` / ``report.json`` (:func:`compare`): held-out chosen and rejected
   log-prob changes from the reference, the fraction of pairs whose chosen log-prob fell and
   the accuracy at every evaluation, for both runs; the filter's statistics; a plot of the
   chosen log-prob trajectories.

Extra ``--config.X=V`` arguments go to every run; ``--stages=dpo,dpo_random`` runs (and
reports) only those stages.
"""

from __future__ import annotations

import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as hh_run  # noqa: E402  (experiments/hh/run.py: run_stage)

from dpo_jax import inspect as inspect_lib  # noqa: E402

STAGES = {"dpo": "smollm2,displacement", "dpo_ches": "smollm2,displacement,ches_filter",
          "dpo_random": "smollm2,displacement,ches_random"}
KEYS = ("logps_delta/chosen", "logps_delta/rejected", "displacement/chosen_fell",
        "rewards/accuracies", "ln_ches/q50")


def compare(workdir: str, stages=tuple(STAGES)) -> dict:
    """Both runs' evaluations side by side (``report.json`` / ``report.md`` in ``workdir``)
    and ``chosen_delta.png``; the answer to "does the filter reduce the fall of the chosen
    log-prob at equal steps?" as the two final numbers, not a verdict."""
    runs = {}
    for stage in stages:
        _, evals = inspect_lib.read_metrics(os.path.join(workdir, stage))
        with open(os.path.join(workdir, stage, "summary.json")) as f:
            summary = json.load(f)
        runs[stage] = {"evals": [{k: e[k] for k in ("step", *KEYS) if k in e} for e in evals],
                       "ches_filter": summary["data"]["train"].get("ches_filter"),
                       "train_pairs": summary["data"]["train"]["num_pairs"],
                       "steps": summary["steps"]}
    final = {s: (r["evals"][-1] if r["evals"] else {}) for s, r in runs.items()}
    out = {"runs": runs, "final": final,
           "chosen_delta_final": {s: f.get("logps_delta/chosen") for s, f in final.items()}}
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for stage, r in runs.items():
        for key, style in (("logps_delta/chosen", "-o"), ("logps_delta/rejected", "--x")):
            ax.plot([e["step"] for e in r["evals"]], [e.get(key) for e in r["evals"]], style,
                    label=f"{stage} {key.split('/')[1]}")
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out log-prob change (nats)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "chosen_delta.png"), dpi=100)
    plt.close(fig)
    inspect_lib.write_report(workdir, out, markdown(out))
    return out


def markdown(r: dict) -> str:
    lines = ["# Likelihood displacement with and without the CHES filter", ""]
    for stage, run in r["runs"].items():
        lines += [f"## {stage} ({run['train_pairs']} train pairs, {run['steps']} steps)", ""]
        if run["ches_filter"]:
            lines += ["filter: " + json.dumps({k: run["ches_filter"][k] for k in (
                "score", "quantile", "threshold", "pairs_before", "pairs_after",
                "score_mean", "score_mean_after", "ln_ches_mean", "ln_ches_mean_after")
                if k in run["ches_filter"]}), ""]
        cols = ["step", *KEYS]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(hh_run._fmt(e.get(c)) for c in cols) + " |"
                  for e in run["evals"]]
        lines.append("")
    lines += ["Final held-out chosen log-prob change (nats): " + ", ".join(
        f"{s} {hh_run._fmt(v)}" for s, v in r["chosen_delta_final"].items()), "",
        "![chosen_delta.png](chosen_delta.png)"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    picked = [a.split("=", 1)[1] for a in argv if a.startswith("--stages=")]
    stages = tuple(picked[-1].split(",")) if picked else tuple(STAGES)
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise SystemExit(f"--stages: unknown {unknown} (known: {', '.join(STAGES)})")
    args, extra = hh_run.stage_args([a for a in argv if not a.startswith("--stages=")],
                                    __doc__)
    workdir = os.path.abspath(args.workdir)
    for stage in stages:
        variants = STAGES[stage]
        path = os.path.join(workdir, stage)
        if not args.report_only:
            hh_run.run_stage(variants + (",smoke" if args.smoke else ""), path, extra)
        inspect_lib.inspect_run(path)
    out = compare(workdir, stages)
    print(os.path.join(workdir, "report.md"))
    return out


if __name__ == "__main__":
    main()
