"""Print the markdown results of an IMDb pipeline workdir: frontier table and SFT-vs-run samples.

    python experiments/imdb/report.py runs/imdb_cpu [--run=dpo_beta0.1] [--n=20]

Reads only what the pipeline wrote (frontier.csv, sft_test_samples.jsonl, the run's
test_samples.jsonl from its last frontier checkpoint); both sample files follow the order of
prefixes_test.jsonl, so row i of each continues the same prompt.
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib

from dpo_jax.data.io import read_jsonl


def _compute_table(d: pathlib.Path) -> None:
    """What each run cost (compute.json) and, for PPO, the proxy (reward-model) score of its
    last frontier point next to the ground truth."""
    if not (d / "compute.json").exists():
        return
    compute = json.loads((d / "compute.json").read_text())
    rm = d / "reward_model" / "summary.json"
    if rm.exists():
        ev = json.loads(rm.read_text())["final_eval"]
        print(f"\nreward model: held-out pair accuracy {ev['accuracy']:.3f} "
              f"(loss {ev['loss']:.3f}) on pairs of prompts it never saw")
    print("\n| run | steps | train wall (s) | trained tokens | no-grad forward tokens | "
          "sampled tokens | frontier eval (s) | last point: reward / proxy |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in compute["runs"].items():
        last = ""
        pts = d / "runs" / name / "frontier_points.jsonl"
        if pts.exists():
            p = read_jsonl(pts)[-1]
            last = f"{p['mean_reward']:.2f}" + (f" / {p['proxy_reward']:.2f}"
                                                if "proxy_reward" in p else "")
        wall = "" if r["train_wall_s"] is None else f"{r['train_wall_s']:.0f}"
        ev = "" if r.get("frontier_eval_s") is None else f"{r['frontier_eval_s']:.0f}"
        print(f"| {name} | {r['steps']} | {wall} | {r['trained_tokens']:,} | "
              f"{r['forward_tokens']:,} | {r['sampled_tokens']:,} | {ev} | {last} |")
    stages = {k: v for k, v in compute["stages"].items() if v is not None}
    if stages:
        print("\nshared stages (s): " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir")
    ap.add_argument("--run", default="dpo_beta0.1")
    ap.add_argument("--n", type=int, default=20)
    args = ap.parse_args()
    d = pathlib.Path(args.workdir)
    print("| method | setting | step | KL (nats/seq) | mean reward | ppl under SFT |\n"
          "| --- | --- | --- | --- | --- | --- |")
    with open(d / "frontier.csv") as f:
        for r in csv.DictReader(f):
            ppl = f"{float(r['sft_ppl']):.1f}" if r.get("sft_ppl") else ""
            print(f"| {r['method']} | {r['setting']} | {r['step']} | {float(r['kl']):.2f} | "
                  f"{float(r['mean_reward']):.2f} | {ppl} |")
    if (d / "real_fluency.json").exists():
        real = json.loads((d / "real_fluency.json").read_text())
        print(f"\nreal test reviews' continuations of the same prefixes: ppl under SFT "
              f"{real['sft_ppl']:.1f} ({real['rows']} continuations, {real['tokens']:,} tokens)")
    _compute_table(d)
    sft = read_jsonl(d / "sft_test_samples.jsonl")
    run = read_jsonl(d / "runs" / args.run / "test_samples.jsonl")
    clean = lambda s: s.replace("|", "/").replace("\n", " ")
    print(f"\n| prompt | SFT completion | SFT reward | {args.run} completion | reward |")
    print("| --- | --- | --- | --- | --- |")
    for a, b in list(zip(sft, run))[: args.n]:
        assert a["prompt"] == b["prompt"]
        print(f"| {clean(a['prompt'])} | {clean(a['completion'])} | {a['reward']:.1f} | "
              f"{clean(b['completion'])} | {b['reward']:.1f} |")


if __name__ == "__main__":
    main()
