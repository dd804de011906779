"""The reward vs KL(pi || pi_ref) frontier (paper, Figure 2 left) as a CSV and a PNG.

Each point is one evaluation of one run: the method (``dpo``, ``ppo``, ``unlikelihood``, ...),
its setting (e.g. ``beta=0.1``), the training step, the sequence-level KL estimated by
:mod:`dpo_jax.proj.imdb.kl`, and the mean ground-truth reward of its samples. A method that reaches
more reward for the same KL dominates; the plot draws one series per method, points of the
same method's different settings and steps all together, as in the paper.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import pathlib
from typing import Iterable, Sequence

FIELDS = ("method", "setting", "step", "kl", "mean_reward", "sft_ppl")


@dataclasses.dataclass(frozen=True)
class FrontierPoint:
    """``sft_ppl``: the samples' perplexity under the SFT model (their fluency; None when not
    measured, e.g. points written before it was)."""

    method: str
    setting: str
    step: int
    kl: float
    mean_reward: float
    sft_ppl: float | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "FrontierPoint":
        ppl = d.get("sft_ppl")
        return cls(str(d["method"]), str(d["setting"]), int(d["step"]), float(d["kl"]),
                   float(d["mean_reward"]), None if ppl in (None, "") else float(ppl))


def _points(points: Iterable[FrontierPoint | dict]) -> list[FrontierPoint]:
    out = [p if isinstance(p, FrontierPoint) else FrontierPoint.from_dict(p) for p in points]
    for p in out:
        if not (math.isfinite(p.kl) and math.isfinite(p.mean_reward)):
            raise ValueError(f"non-finite point {p}")
    return out


def sort_points(points: Iterable[FrontierPoint | dict]) -> list[FrontierPoint]:
    """Points in a stable, readable order: method, setting, step."""
    return sorted(_points(points), key=lambda p: (p.method, p.setting, p.step))


def write_frontier_csv(points: Iterable[FrontierPoint | dict], path: str | pathlib.Path):
    """Write ``method,setting,step,kl,mean_reward,sft_ppl`` rows (sorted); returns the path."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FIELDS)
        for p in sort_points(points):
            w.writerow([p.method, p.setting, p.step, repr(p.kl), repr(p.mean_reward),
                        "" if p.sft_ppl is None else repr(p.sft_ppl)])
    return path


def read_frontier_csv(path: str | pathlib.Path) -> list[FrontierPoint]:
    with pathlib.Path(path).open(newline="") as f:
        return [FrontierPoint.from_dict(row) for row in csv.DictReader(f)]


def pareto_front(points: Sequence[FrontierPoint]) -> list[FrontierPoint]:
    """Points not dominated (lower-or-equal KL *and* higher-or-equal reward) by another point.

    Sorted by KL; this is the envelope a method's frontier is read from.
    """
    front: list[FrontierPoint] = []
    best = -math.inf
    for p in sorted(points, key=lambda p: (p.kl, -p.mean_reward)):
        if p.mean_reward > best:
            front.append(p)
            best = p.mean_reward
    return front


def plot_frontier(
    points: Iterable[FrontierPoint | dict],
    path: str | pathlib.Path,
    *,
    title: str = "IMDb sentiment generation: reward vs KL",
    reward_label: str = "mean reward (sentiment logit)",
    kl_max: float | None = None,
) -> pathlib.Path:
    """Scatter reward vs KL, one colour per method, each method's Pareto envelope as a line.

    ``kl_max``: the x-axis ends there; points beyond it (e.g. a collapsed run) are drawn on the
    edge as ``>`` markers and counted in the title, so they neither vanish nor squash the rest.
    The CSV always holds every point unchanged."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    pts = sort_points(points)
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    beyond = [p for p in pts if kl_max is not None and p.kl > kl_max]
    for method in sorted({p.method for p in pts}):
        mine = [p for p in pts if p.method == method and p not in beyond]
        if not mine:
            continue
        sc = ax.scatter([p.kl for p in mine], [p.mean_reward for p in mine], s=14, alpha=0.6,
                        label=method)
        colour = sc.get_facecolor()[0][:3]
        front = pareto_front(mine)
        ax.plot([p.kl for p in front], [p.mean_reward for p in front], color=colour,
                linewidth=1.2)
        out = [p for p in beyond if p.method == method]
        if out:
            ax.scatter([kl_max] * len(out), [p.mean_reward for p in out], marker=">", s=24,
                       color=colour, alpha=0.8)
    if beyond:
        ax.set_xlim(right=kl_max * 1.02)
        title += f"\n({len(beyond)} points with KL > {kl_max:g} drawn at the edge as >)"
    ax.set_xlabel("KL(pi || pi_ref), nats per sequence")
    ax.set_ylabel(reward_label)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if pts:
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_frontier(
    points: Iterable[FrontierPoint | dict], out_dir: str | pathlib.Path,
    kl_max: float | None = None,
) -> tuple[pathlib.Path, pathlib.Path]:
    """``out_dir/frontier.csv`` and ``out_dir/frontier.png``; returns both paths."""
    pts = _points(points)
    out_dir = pathlib.Path(out_dir)
    return (write_frontier_csv(pts, out_dir / "frontier.csv"),
            plot_frontier(pts, out_dir / "frontier.png", kl_max=kl_max))
