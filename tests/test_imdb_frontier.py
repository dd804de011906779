"""Frontier CSV/PNG from fake (method, setting, step, kl, reward) points."""

from __future__ import annotations

import csv

import pytest

from dpo_jax.proj.imdb import frontier
from dpo_jax.proj.imdb.frontier import FrontierPoint

POINTS = [
    FrontierPoint("dpo", "beta=0.1", 200, 8.0, 0.95),
    FrontierPoint("dpo", "beta=0.1", 100, 4.0, 0.80),
    {"method": "ppo", "setting": "target_kl=6", "step": 50, "kl": 6.0, "mean_reward": 0.7},
    FrontierPoint("dpo", "beta=0.5", 100, 2.0, 0.60),
    FrontierPoint("ppo", "target_kl=6", 100, 9.0, 0.65),
]


def test_csv_content(tmp_path):
    csv_path, png_path = frontier.write_frontier(POINTS, tmp_path)
    assert csv_path == tmp_path / "frontier.csv"
    with csv_path.open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["method", "setting", "step", "kl", "mean_reward", "sft_ppl"]
    assert rows[1:] == [  # no perplexity measured for these points: an empty cell
        ["dpo", "beta=0.1", "100", "4.0", "0.8", ""],
        ["dpo", "beta=0.1", "200", "8.0", "0.95", ""],
        ["dpo", "beta=0.5", "100", "2.0", "0.6", ""],
        ["ppo", "target_kl=6", "50", "6.0", "0.7", ""],
        ["ppo", "target_kl=6", "100", "9.0", "0.65", ""],
    ]
    assert frontier.read_frontier_csv(csv_path) == frontier.sort_points(POINTS)


def test_png_written(tmp_path):
    _, png = frontier.write_frontier(POINTS, tmp_path / "sub")
    assert png.exists() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kl_max_clips_the_axis_not_the_csv(tmp_path, monkeypatch):
    """Points beyond kl_max are drawn on the edge (counted in the title); the CSV keeps them."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    seen = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        ax = fig.axes[0]
        seen["xlim"], seen["title"] = ax.get_xlim(), ax.get_title()
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    far = POINTS + [FrontierPoint("ppo", "target_kl=6", 150, 70.0, 0.1)]
    csv_path, _ = frontier.write_frontier(far, tmp_path, kl_max=10.0)
    assert seen["xlim"][1] == pytest.approx(10.2)
    assert "1 points with KL > 10" in seen["title"]
    assert len(frontier.read_frontier_csv(csv_path)) == len(far)
    plt.close("all")


def test_pareto_front():
    front = frontier.pareto_front(frontier.sort_points(POINTS))
    assert [(p.kl, p.mean_reward) for p in front] == [(2.0, 0.6), (4.0, 0.8), (8.0, 0.95)]


def test_rejects_non_finite(tmp_path):
    with pytest.raises(ValueError):
        frontier.write_frontier([FrontierPoint("dpo", "b", 1, float("nan"), 1.0)], tmp_path)
