"""Collect frontier points (jsonl rows {method, setting, step, kl, mean_reward}) into a CSV + PNG.

    python experiments/imdb/plot_frontier.py runs/imdb/*/frontier_points.jsonl --out=runs/imdb
"""

from __future__ import annotations

import argparse

from dpo_jax.data.io import read_jsonl
from dpo_jax.proj.imdb.frontier import write_frontier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("points", nargs="+", help="jsonl files of frontier points")
    ap.add_argument("--out", required=True)
    ap.add_argument("--kl-max", type=float, default=None,
                    help="end the x-axis here; farther points are drawn on the edge")
    args = ap.parse_args()
    points = [row for path in args.points for row in read_jsonl(path)]
    csv_path, png_path = write_frontier(points, args.out, kl_max=args.kl_max)
    print(f"{len(points)} points -> {csv_path}, {png_path}")


if __name__ == "__main__":
    main()
