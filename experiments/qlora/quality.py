"""DPO held-out accuracy with the LoRA base quantised (QLoRA) against the bfloat16 base, at
equal steps, on the offline task (the synthetic preference task of configs/default.py).

    python experiments/qlora/quality.py --root=runs/qlora [--steps=200] [--seeds=0,1,2]

As experiments/bench/README.md's LoRA runs: a full-parameter DPO run stopped after 15 steps is
the base (partly trained: its held-out accuracy is below 0.9), then LoRA DPO
(``configs/lora_dpo.py``: rank 16 on every projection and the LM head, lr 3e-3) over that
base stored in bfloat16 (``model.param_dtype``), int8 or NF4 (``model.lora.base_quant``), each
with ``seed`` 0, 1, 2 (adapter init and data order). Prints one JSON line per run (held-out
accuracy, loss and margin at the end, from summary.json) and a summary line per base; runs
that finished are read back, not rerun. Numbers: experiments/qlora/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from configs import default as default_cfg  # noqa: E402
from configs import lora_dpo  # noqa: E402
from dpo_jax.train import train_and_evaluate  # noqa: E402

BASES = ("none", "int8", "nf4")


def run(config, workdir: str) -> dict:
    path = os.path.join(workdir, "summary.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return train_and_evaluate(config, workdir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="runs/qlora")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    base_dir = os.path.join(args.root, "full15")
    c = default_cfg.get_config()
    c.train.update(steps=15, eval_every=15, checkpoint_every=15)
    s = run(c, base_dir)
    print(json.dumps({"run": "full15", "accuracy": s["final_eval"]["rewards/accuracies"]}))
    acc: dict[str, list[float]] = {b: [] for b in BASES}
    for seed in (int(x) for x in args.seeds.split(",")):
        for quant in BASES:
            c = lora_dpo.get_config()
            c.seed = seed
            c.init.policy = base_dir
            c.model.param_dtype = "bfloat16"  # the base (the adapters are float32)
            c.model.lora.base_quant = quant
            c.train.update(steps=args.steps, eval_every=args.steps // 2,
                           checkpoint_every=args.steps)
            s = run(c, os.path.join(args.root, f"{quant}_s{seed}"))
            e = s["final_eval"]
            acc[quant].append(e["rewards/accuracies"])
            print(json.dumps({"base": quant, "seed": seed, "steps": args.steps,
                              "accuracy": e["rewards/accuracies"], "loss": e["loss"],
                              "margin": e["rewards/margins"]}), flush=True)
    for quant, xs in acc.items():
        print(json.dumps({"base": quant, "accuracy_mean": round(statistics.mean(xs), 4),
                          "accuracy_min": min(xs), "accuracy_max": max(xs), "n": len(xs)}))


if __name__ == "__main__":
    main()
