"""Score sampled completions with the sentiment reward and write all strict-preference pairs.

    python experiments/imdb/make_pairs.py --samples=runs/imdb/samples.jsonl \
        --reward=runs/imdb/sentiment --out=runs/imdb/pairs.parquet

``--samples``: jsonl rows ``{"prompt": str, "completions": [str, ...]}`` (4 per prompt in the
paper). Output rows ``{prompt, chosen, rejected, chosen_reward, rejected_reward}``; ties dropped,
so a prompt yields at most 6 pairs.
"""

from __future__ import annotations

import argparse

import numpy as np

from dpo_jax.data.io import read_jsonl
from dpo_jax.proj.imdb.pairs import build_pair_dataset, write_pairs
from dpo_jax.proj.imdb.sentiment import SentimentReward


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", required=True)
    ap.add_argument("--reward", required=True,
                    help="directory written by dpo_jax.proj.imdb.sentiment")
    ap.add_argument("--out", required=True, help=".jsonl or .parquet")
    args = ap.parse_args()
    rows = read_jsonl(args.samples)
    reward = SentimentReward.load(args.reward)
    prompts = [r["prompt"] for r in rows]
    completions = [list(r["completions"]) for r in rows]
    flat_p = [p for p, cs in zip(prompts, completions) for _ in cs]
    flat_c = [c for cs in completions for c in cs]
    flat_r = reward(flat_p, flat_c)
    bounds = np.cumsum([0] + [len(cs) for cs in completions])
    rewards = [flat_r[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    pairs = build_pair_dataset(prompts, completions, rewards)
    write_pairs(pairs, args.out)
    print(f"{len(rows)} prompts, {len(flat_c)} completions, mean reward {flat_r.mean():.3f}, "
          f"{len(pairs)} pairs -> {args.out}")


if __name__ == "__main__":
    main()
