"""Train the offline default task (synthetic preferences, known ground truth) with every loss.

A broken loss shows up as an outlier in held-out preference accuracy. Each loss runs with the
hyperparameters its row of docs/losses.md recommends, through the same main job:

    python experiments/losses/sweep.py --steps 150 --out runs/loss_sweep

Writes ``OUT/results.csv`` and prints a Markdown table (paste it into README.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time

from dpo_jax.workdir import finished_summary

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name -> config overrides (beta and loss options from the docs/losses.md table).
LOSSES: dict[str, dict[str, str]] = {
    "sigmoid": {"beta": "0.1"},
    "sigmoid (cDPO eps=0.2)": {"name": "sigmoid", "beta": "0.1", "label_smoothing": "0.2"},
    "sigmoid (reference-free)": {"name": "sigmoid", "beta": "0.1", "reference_free": "True"},
    "hinge": {"beta": "0.1"},
    "ipo": {"beta": "0.1"},
    "exo_pair": {"beta": "0.1"},
    "nca_pair": {"beta": "0.1"},
    "robust": {"beta": "0.1", "label_smoothing": "0.1"},
    "bco_pair": {"beta": "0.1"},
    "sppo_hard": {"beta": "0.1"},
    "aot": {"beta": "0.1"},
    "aot_unpaired": {"beta": "0.1"},
    "apo_zero": {"beta": "0.1"},
    "apo_down": {"beta": "0.1"},
    "discopop": {"beta": "0.1"},
    "sft": {},
    "simpo": {"beta": "2.0", "simpo_gamma": "0.5"},
    "orpo": {"beta": "0.1"},
    "rpo": {"beta": "0.1", "rpo_alpha": "1.0"},
    "rdpo": {"beta": "0.1", "rdpo_alpha": "0.01"},
    "sigmoid,sft (1, 0.5)": {"name": "sigmoid,sft", "beta": "0.1", "weights": "(1.0, 0.5)"},
    # TRL 1.16's remaining knobs, DPO-Positive and TR-DPO (keys with a dot are full config paths).
    "sigmoid_norm": {"beta": "5.0"},
    "dpop": {"beta": "0.1", "dpop_lambda": "50"},
    "sigmoid (forward_kl)": {"name": "sigmoid", "beta": "0.1", "f_divergence_type": "forward_kl"},
    "sigmoid (js_divergence)": {"name": "sigmoid", "beta": "0.1",
                                "f_divergence_type": "js_divergence"},
    "sigmoid (alpha_divergence 0.5)": {"name": "sigmoid", "beta": "0.1",
                                       "f_divergence_type": "alpha_divergence",
                                       "f_alpha_divergence_coef": "0.5"},
    "sigmoid (WPO)": {"name": "sigmoid", "beta": "0.1", "use_weighting": "True"},
    "sigmoid (LD-DPO alpha 0.5)": {"name": "sigmoid", "beta": "0.1", "ld_alpha": "0.5"},
    "sigmoid (TR-DPO tau 16 alpha 0.6)": {"name": "sigmoid", "beta": "0.1",
                                          "train.ref_sync_every": "16",
                                          "train.ref_mixup_alpha": "0.6"},
}


def run_one(label: str, overrides: dict[str, str], steps: int, out: str) -> dict:
    workdir = os.path.join(out, label.replace(" ", "_").replace(",", "+").replace("(", "")
                           .replace(")", "").replace("=", ""))
    name = overrides.get("name", label)
    args = [sys.executable, "-m", "dpo_jax.main", "--config=configs/default.py",
            f"--workdir={workdir}", f"--config.loss.name={name}",
            f"--config.train.steps={steps}", f"--config.train.eval_every={steps}",
            "--config.train.checkpoint_every=0"]
    args += [f"--config.{k}={v}" if "." in k else f"--config.loss.{k}={v}"
             for k, v in overrides.items() if k != "name"]
    t0 = time.time()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{label} failed:\n{proc.stderr[-3000:]}")
    summary = finished_summary(workdir)  # RunStopped when SIGTERM stopped it
    ev = summary["final_eval"]
    return {"loss": label, "eval_accuracy": ev["rewards/accuracies"],
            "eval_margin": ev["rewards/margins"], "eval_loss": ev["loss"],
            "eval_logps_chosen": ev["logps/chosen"], "eval_logps_rejected": ev["logps/rejected"],
            # the first train batch's chosen log-prob (the initial policy): has it fallen?
            "train_logps_chosen_first": summary["first_train"].get("logps/chosen"),
            "wall_s": round(time.time() - t0, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", default="runs/loss_sweep")
    parser.add_argument("--only", default="", help="comma-separated subset of labels")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    wanted = [s for s in args.only.split(",") if s] or list(LOSSES)
    rows = []
    for label in wanted:
        rows.append(run_one(label, LOSSES[label], args.steps, args.out))
        print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(args.out, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("\n| loss | held-out accuracy | reward margin | eval loss | logps chosen (first "
          "train batch -> eval) | logps rejected | wall s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| `{r['loss']}` | {r['eval_accuracy']:.3f} | {r['eval_margin']:.3f} | "
              f"{r['eval_loss']:.4f} | {r['train_logps_chosen_first']:.1f} -> "
              f"{r['eval_logps_chosen']:.1f} | {r['eval_logps_rejected']:.1f} | {r['wall_s']} |")


if __name__ == "__main__":
    main()
