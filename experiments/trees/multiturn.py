"""Turn-level DPO on preference trees vs last-turn-only and whole-conversation pairs (issue 31,
item 5), on a synthetic multi-turn task with a known per-turn reward.

The task (``dpo_jax/data/synthetic.py``, "multi-turn conversations"): T rounds of a user turn
(its own topic token + content tokens) and an assistant turn; an assistant turn's true reward
is the fraction of its content tokens liked under its own turn's topic (with
``--turn_shift`` != 0 the liked class also moves with the turn index, so the history decides
what is preferred). At every turn a chosen and a rejected alternative; the chosen one
continues the conversation. Three runs of the same tiny model, same steps, same conversations
per step (``--batch`` conversations), same optimizer:

* ``turn_level``: ``data.format='trees'``, a DPO term at every branch point (T per
  conversation), each conditioned on its own (chosen) history, one forward per tree;
* ``last_turn``: ``data.synthetic.conversation_pairs='last_turn'``, one pair per
  conversation, the final turn's alternatives after the full history;
* ``whole``: ``conversation_pairs='whole'``, the all-chosen conversation vs the all-rejected
  one after the first user turn (every later token scored), one DPO term per conversation.

Equal compute = the same conversations per step, so each method sees the same tokens: the tree
runs them once (T(U + 2R) columns, U / R the user / response lengths), the pairs twice over
the shared part (2 T(U + R)); the measured non-padding tokens and padded columns per step are
reported (trees use fewer). Metric, on held-out conversations (``eval_seed``): at every turn
depth, the fraction of branch points whose implicit reward ``beta * (log pi - log pi_ref)``
ranks the higher-true-reward alternative first (beta > 0 only scales it; a tie, as under the
reference itself, counts as wrong), and the mean margin of the log-ratios (chosen minus
rejected, in nats: the implicit reward margin divided by beta).

    python experiments/trees/multiturn.py --workdir=runs/trees_mt --seeds=0,1 [--steps=200]

Writes ``WORKDIR/s<seed>/<method>/`` (each a normal run) and ``WORKDIR/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import checkpoint as ckpt_lib
from dpo_jax.config import base_config
from dpo_jax.data import loading
from dpo_jax.models import Model, model_config_from
from dpo_jax.step import StepConfig, sequence_stats
from dpo_jax.tasks import get_task
from dpo_jax.workdir import finished_summary

METHODS = {
    "turn_level": {"data.format": "trees"},
    "last_turn": {"data.format": "pairs", "data.synthetic.conversation_pairs": "last_turn"},
    "whole": {"data.format": "pairs", "data.synthetic.conversation_pairs": "whole"},
}


def method_config(name: str, args):
    c = base_config()
    c.update_from_flattened_dict({
        **METHODS[name], "seed": args.seed, "loss.name": "sigmoid",
        "data.synthetic.turns": args.turns, "data.synthetic.turn_shift": args.turn_shift,
        "data.synthetic.prompt_len": (2, 4), "data.synthetic.response_len": (4, 8),
        "data.synthetic.num_train": args.num_train, "data.synthetic.num_eval": args.num_eval,
        "train.steps": args.steps, "train.batch_size": args.batch, "train.eval_every": 0,
        "train.checkpoint_every": 0, "train.eval_batch_size": 64, "train.log_every": 50})
    return c


def eval_config(c):
    """The run's config with the held-out conversations read as trees (every turn scored)."""
    e = c.copy_and_resolve_references()
    e.data.format = "trees"
    return e


def per_depth(c, workdir: str | None) -> dict:
    """Held-out per-turn accuracy and mean margin of the run's final policy (``workdir``; None:
    the reference itself, margins 0) on the eval trees, by branch-point depth."""
    model = Model(model_config_from(c.model))
    ref = jax.jit(model.init)(jax.random.key(c.seed))
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), ref)
    policy = ref if workdir is None else ckpt_lib.restore_params(workdir, like)
    pipe = loading.build_pipeline(eval_config(c).data, split="eval", global_batch_size=32)
    score = jax.jit(lambda p, b: sequence_stats(model, p, b, StepConfig(), None).logps)
    margins, depths = [], []
    for batch_np in pipe:
        batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
        ratio = np.asarray(score(policy, batch) - score(ref, batch))
        chosen, rejected = np.split(ratio, 2)
        keep = batch_np["pair_weight"] > 0
        margins.append((chosen - rejected)[keep])
        depths.append(batch_np["bp_depth"][keep])
    m, d = np.concatenate(margins), np.concatenate(depths)
    return {f"depth_{k}": {"accuracy": float(np.mean(m[d == k] > 0)),
                           "margin": float(np.mean(m[d == k])), "branch_points": int((d == k).sum())}
            for k in sorted(set(d.tolist()))}


def tokens_per_step(c, batches: int = 16) -> dict:
    """Mean non-padding tokens and padded columns (rows x row length) per train step over the
    first ``batches`` batches of the run's train stream (what goes through the model)."""
    pipe = loading.build_pipeline(c.data, split="train", global_batch_size=c.train.batch_size,
                                  seed=c.seed)
    real, padded = [], []
    for i in range(min(batches, len(pipe.epoch_batches(0)))):
        b = pipe.batch_at(0, i)
        real.append(int((b["segment_ids"] > 0).sum()))
        padded.append(int(b["segment_ids"].size))
    return {"tokens": float(np.mean(real)), "columns": float(np.mean(padded))}


def table(results: dict) -> str:
    """Markdown tables of ``results``: per method and turn depth the held-out accuracy and mean
    margin, mean over seeds with the half range (max - min) / 2 and each seed's value; then the
    tokens per step and train wall times."""
    runs = [r for r in results["runs"].values() if r["method"] != "reference"]  # margins 0
    methods = list(dict.fromkeys(r["method"] for r in runs))
    depths = sorted({d for r in runs for d in r["eval"]})
    lines = ["| method | " + " | ".join(f"turn {d.split('_')[1]} accuracy" for d in depths)
             + " | " + " | ".join(f"turn {d.split('_')[1]} margin" for d in depths) + " |",
             "| --- |" + " --- |" * (2 * len(depths))]
    for m in methods:
        rs = sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"])
        cells = []
        for key in ("accuracy", "margin"):
            for d in depths:
                v = np.asarray([r["eval"][d][key] for r in rs])
                each = " ".join(f"{x:.3f}" for x in v)
                cells.append(f"{v.mean():.3f} ± {np.ptp(v) / 2:.3f} [{each}]")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += ["", "| method | tokens / step | padded columns / step | train wall s (per seed) |",
              "| --- | --- | --- | --- |"]
    for m in methods:
        rs = sorted((r for r in runs if r["method"] == m and "tokens" in r),
                    key=lambda r: r["seed"])
        if rs:
            lines.append(f"| {m} | {np.mean([r['tokens'] for r in rs]):.0f} | "
                         f"{np.mean([r['columns'] for r in rs]):.0f} | "
                         + " ".join(f"{r['train_wall_s']:.0f}" for r in rs) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seeds", default="0,1", help="init and data-order seeds")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--turn_shift", type=int, default=0)
    parser.add_argument("--batch", type=int, default=32, help="conversations per step")
    parser.add_argument("--num_train", type=int, default=4096)
    parser.add_argument("--num_eval", type=int, default=512)
    parser.add_argument("--table", action="store_true",
                        help="only print the tables of WORKDIR/results.json (WORKDIR: a "
                        "comma list merges several)")
    args = parser.parse_args()
    if args.table:  # WORKDIR may be a comma list (seeds run as separate processes)
        merged = {"runs": {}}
        for w in args.workdir.split(","):
            with open(os.path.join(w, "results.json")) as f:
                merged["runs"].update(json.load(f)["runs"])
        print(table(merged))
        return
    results = {"args": vars(args), "runs": {}}
    for seed in map(int, args.seeds.split(",")):
        args.seed = seed
        for name in args.methods.split(","):
            c = method_config(name, args)
            workdir = os.path.join(args.workdir, f"s{seed}", name)
            start = time.time()
            get_task("dpo")(c, workdir)
            finished_summary(workdir)  # RunStopped when SIGTERM stopped it: rerun resumes
            wall = time.time() - start
            out = {"seed": seed, "method": name, "train_wall_s": round(wall, 1),
                   **tokens_per_step(c), "eval": per_depth(c, workdir)}
            results["runs"][f"s{seed}/{name}"] = out
            print(json.dumps(out), flush=True)
        results["runs"][f"s{seed}/reference"] = {"seed": seed, "method": "reference",
                                                 "eval": per_depth(c, None)}
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
