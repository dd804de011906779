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


def _rows(path: pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in open(path, encoding="utf-8") if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir")
    ap.add_argument("--run", default="dpo_beta0.1")
    ap.add_argument("--n", type=int, default=20)
    args = ap.parse_args()
    d = pathlib.Path(args.workdir)
    print("| method | setting | step | KL (nats/seq) | mean reward |\n| --- | --- | --- | --- | --- |")
    with open(d / "frontier.csv") as f:
        for r in csv.DictReader(f):
            print(f"| {r['method']} | {r['setting']} | {r['step']} | {float(r['kl']):.2f} | "
                  f"{float(r['mean_reward']):.2f} |")
    sft = _rows(d / "sft_test_samples.jsonl")
    run = _rows(d / "runs" / args.run / "test_samples.jsonl")
    clean = lambda s: s.replace("|", "/").replace("\n", " ")
    print(f"\n| prompt | SFT completion | SFT reward | {args.run} completion | reward |")
    print("| --- | --- | --- | --- | --- |")
    for a, b in list(zip(sft, run))[: args.n]:
        assert a["prompt"] == b["prompt"]
        print(f"| {clean(a['prompt'])} | {clean(a['completion'])} | {a['reward']:.1f} | "
              f"{clean(b['completion'])} | {b['reward']:.1f} |")


if __name__ == "__main__":
    main()
