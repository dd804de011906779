"""Pairs vs Plackett-Luce vs KTO on the same ranked responses, at equal compute.

The synthetic task (``dpo_jax/data/synthetic.py``) extended to K = 4 responses per prompt with
known true rewards (``synthetic.make_ranked``). Three runs of the offline default model, each
forwarding 64 sequences per step for the same number of steps:

* ``pairs``: DPO (``sigmoid``) on the common binarisation, the best response vs a random lower
  one (``data.synthetic.from_lists``), 32 pairs per step;
* ``plackett_luce``: all 4 ranked responses (``data.format='ranked'``), 16 lists per step;
* ``kto``: every response labelled desirable when its true reward >= 0.5
  (``data.format='unpaired'``, ``data.synthetic.from_lists``), 32 examples per step (each also
  runs its mismatched KL completion).

Then each trained policy scores 512 held-out lists of 4 (eval seed): implicit reward
``log pi - log pi_ref`` per response (beta only scales it), compared with the true reward:
pairwise accuracy over all within-prompt pairs of different true reward, Spearman within each
prompt (mean), and Pearson / Spearman pooled over all responses.

    python experiments/ranked/run.py --workdir=runs/ranked [--steps=200] [--seed=0]

Writes ``WORKDIR/<method>/`` (each a normal run) and ``WORKDIR/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from dpo_jax import checkpoint as ckpt_lib
from dpo_jax.config import base_config
from dpo_jax.data import ranked as ranked_lib
from dpo_jax.data import synthetic
from dpo_jax.models import Model, model_config_from
from dpo_jax.step import StepConfig, sequence_stats
from dpo_jax.tasks import get_task
from dpo_jax.workdir import finished_summary

METHODS = {
    "pairs": {"data.format": "pairs", "data.synthetic.from_lists": True, "loss.name": "sigmoid",
              "train.batch_size": 32},
    "plackett_luce": {"data.format": "ranked", "loss.name": "plackett_luce",
                      "train.batch_size": 16},
    "kto": {"data.format": "unpaired", "data.synthetic.from_lists": True, "loss.name": "kto",
            "train.batch_size": 32},
}


def method_config(name: str, steps: int):
    c = base_config()
    c.update_from_flattened_dict({**METHODS[name], "train.steps": steps, "train.eval_every": 0,
                                  "train.checkpoint_every": 0, "train.eval_batch_size": 64})
    return c


def implicit_rewards(c, workdir: str, lists: list[dict]) -> np.ndarray:
    """[N, K] log pi - log pi_ref of each held-out response under the run's final policy."""
    model = Model(model_config_from(c.model))
    ref = jax.jit(model.init)(jax.random.key(c.seed))
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), ref)
    policy = ckpt_lib.restore_params(workdir, like)
    items = [ranked_lib._checked_list(it["prompt"], it["responses"], list(it["scores"]),
                                      end_ids={synthetic.EOS_ID}, is_blank=None,
                                      file="synthetic", row=i) for i, it in enumerate(lists)]
    pipe = ranked_lib.RankedPipeline(items, c.data, train=False, global_batch_size=64, pad_id=0)
    score = jax.jit(lambda p, b: sequence_stats(model, p, b, StepConfig(), None).logps)
    out = []
    for batch_np in pipe:
        batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
        K = batch_np["slot_rank"].shape[1]
        ratio = np.asarray(score(policy, batch) - score(ref, batch)).reshape(K, -1).T
        out.append(ratio[batch_np["pair_weight"] > 0])
    return np.concatenate(out)


def agreement(r_NK: np.ndarray, true_NK: np.ndarray) -> dict[str, float]:
    """Pairwise accuracy, within-prompt Spearman (mean over prompts without all-tied truths)
    and pooled Pearson / Spearman of implicit vs true rewards."""
    right = total = 0
    rhos = []
    for r, t in zip(r_NK, true_NK):
        for i in range(len(t)):
            for j in range(i + 1, len(t)):
                if t[i] != t[j]:
                    total += 1
                    right += (r[i] - r[j]) * (t[i] - t[j]) > 0
        if np.ptp(t) > 0:
            rhos.append(stats.spearmanr(r, t).statistic)
    return {"pairwise_accuracy": right / total,
            "spearman_within_prompt": float(np.nanmean(rhos)),
            "pearson_pooled": float(stats.pearsonr(r_NK.ravel(), true_NK.ravel()).statistic),
            "spearman_pooled": float(stats.spearmanr(r_NK.ravel(), true_NK.ravel()).statistic)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seed", type=int, default=0, help="init and data-order seed")
    args = parser.parse_args()
    results = {}
    for name in args.methods.split(","):
        c = method_config(name, args.steps)
        c.seed = args.seed
        workdir = os.path.join(args.workdir, name)
        start = time.time()
        get_task("dpo")(c, workdir)
        finished_summary(workdir)  # RunStopped when SIGTERM stopped it: rerun resumes
        wall = time.time() - start
        s = c.data.synthetic
        task = synthetic.SyntheticTask.from_config(s)
        lists = synthetic.make_ranked(task, s.num_eval, s.eval_seed, int(s.num_responses))
        r = implicit_rewards(c, workdir, lists)
        truth = np.stack([it["scores"] for it in lists])
        results[name] = {"steps": args.steps, "seed": args.seed, "sequences_per_step": 64,
                         "train_wall_s": round(wall, 1), **agreement(r, truth)}
        print(name, json.dumps(results[name]), flush=True)
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
