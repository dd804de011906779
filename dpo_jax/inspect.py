"""A run's likelihood-displacement report: ``python -m dpo_jax.inspect --workdir=RUN``.

Reads what a run with ``train.diagnostics=True`` wrote (``dpo_jax/diagnostics.py``):
``metrics.jsonl`` (train and ``eval/`` records) and ``eval_pairs/step_<n>.jsonl`` (each eval
pair's values), and writes ``RUN/inspect/`` (or ``--out``):

* ``report.md``: the diagnostics at every evaluation (log-prob changes from the reference,
  the fraction of pairs whose chosen log-prob fell, CHES quantiles, accuracy), the correlation
  of each pair's CHES / ln-CHES (at the last and at the first evaluation, ``@<step>``: the
  nearest to the starting model the paper scores) with the change of its chosen log-prob at the
  last evaluation (Razin et al. 2024: pairs of higher CHES lose more chosen likelihood, a
  negative correlation), and the ``--top`` pairs whose chosen log-prob fell most, decoded as text (the
  run's tokenizer; token ids for the synthetic task);
* ``logps_delta.png``, ``displacement.png``, ``ches.png``, ``margins_hist.png``,
  ``ches_vs_delta.png``: those over training and the last evaluation's pairs;
* ``report.json``: the numbers of the report.

Raises FileNotFoundError naming the file when the run has no ``config.json`` or wrote no
diagnostics (set ``train.diagnostics=True`` and evaluate: ``train.eval_every`` > 0).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from dpo_jax import eval_pairs, evaluation, lora_base, preference_data  # noqa: E402
from dpo_jax.config import read_config  # noqa: E402
from dpo_jax.diagnostics import HIST_PREFIX  # noqa: E402

_DELTAS = ("logps_delta/chosen", "logps_delta/rejected")
_FELL = ("displacement/chosen_fell", "displacement/both_fell")
_TABLE = ("rewards/accuracies", *_DELTAS, *_FELL, "ches/q50", "ln_ches/q50")


def read_metrics(workdir: str) -> tuple[list[dict], list[dict]]:
    """``(train records, eval records)`` of ``workdir/metrics.jsonl``, eval keys without their
    ``eval/`` prefix; FileNotFoundError when the file is absent."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: has the run in {workdir!r} started?")
    train, evals = [], []
    with open(path) as f:
        for line in filter(str.strip, f):
            r = json.loads(line)
            ev = {k[5:]: v for k, v in r.items() if k.startswith("eval/")}
            if ev:
                evals.append({"step": r["step"], **ev})
            rest = {k: v for k, v in r.items() if not k.startswith("eval/")}
            if len(rest) > 1:
                train.append(rest)
    return train, evals


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in pts], [p[1] for p in pts]


def _rank(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(np.float64)


def correlations(rows: list[dict], scored: list[dict] | None = None,
                 tag: str = "") -> dict[str, float]:
    """Pearson and Spearman (rank, ties in file order) correlations of ``ches`` and ``ln_ches``
    with ``chosen_delta`` over ``rows`` (NaN with fewer than 2 pairs or no spread). ``scored``:
    take the scores from these rows instead (matched by split and index: e.g. the first
    evaluation's, nearest the starting model that the paper scores), named ``<name><tag>``."""
    out = {}
    if len(rows) < 2 or "chosen_delta" not in rows[0]:
        return out
    delta = np.asarray([r["chosen_delta"] for r in rows])
    by_pair = {(r["split"], r["index"]): r for r in (scored or rows)}
    for name in ("ches", "ln_ches"):
        x = np.asarray([by_pair[(r["split"], r["index"])][name] for r in rows])
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"pearson({name}{tag}, chosen_delta)"] = float(np.corrcoef(x, delta)[0, 1])
            out[f"spearman({name}{tag}, chosen_delta)"] = float(
                np.corrcoef(_rank(x), _rank(delta))[0, 1])
    return out


def _plot(path: str, title: str, ylabel: str, lines: list[tuple[str, list, list]]) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, xs, ys in lines:
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.axhline(0.0, color="grey", lw=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plots(out: str, train: list[dict], evals: list[dict], last: list[dict]) -> list[str]:
    made = []

    def lines(keys, records=(("train", train), ("eval", evals))):
        return [(f"{name} {k}", *_series(recs, k)) for name, recs in records for k in keys]

    specs = [("logps_delta.png", "log-prob change from the reference", "nats (summed)", _DELTAS),
             ("displacement.png", "pairs whose log-probs fell", "fraction", _FELL)]
    for name, title, ylabel, keys in specs:
        _plot(os.path.join(out, name), title, ylabel, lines(keys))
        made.append(name)
    ches_keys = [k for k in ("ches/q10", "ches/q50", "ches/q90") if any(k in r for r in evals)]
    _plot(os.path.join(out, "ches.png"), "CHES over the eval pairs (policy)", "CHES",
          lines(ches_keys, (("eval", evals),)) + lines(("ches/mean",), (("train", train),)))
    made.append("ches.png")
    if evals:
        bins = [k for k in evals[-1] if k.startswith(HIST_PREFIX)]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        ax.bar(range(len(bins)), [evals[-1][k] for k in bins])
        ax.set_xticks(range(len(bins)), [k[len(HIST_PREFIX):] for k in bins], rotation=45,
                      fontsize=7)
        ax.set_title(f"reward margins of the eval pairs, step {evals[-1]['step']}")
        ax.set_ylabel("pairs")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "margins_hist.png"), dpi=100)
        plt.close(fig)
        made.append("margins_hist.png")
    if last and "chosen_delta" in last[0]:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        delta = [r["chosen_delta"] for r in last]
        for ax, name in zip(axes, ("ches", "ln_ches")):
            ax.scatter([r[name] for r in last], delta, s=8)
            ax.set_xlabel(name)
            ax.set_ylabel("chosen log-prob change (nats)")
            ax.axhline(0.0, color="grey", lw=0.5)
        fig.suptitle(f"eval pairs at step {last[0]['step']}")
        fig.tight_layout()
        fig.savefig(os.path.join(out, "ches_vs_delta.png"), dpi=100)
        plt.close(fig)
        made.append("ches_vs_delta.png")
    return made


def _texts(workdir: str, rows: list[dict]) -> dict[tuple[str, int], dict[str, str]]:
    """Decoded prompt / chosen / rejected of ``rows``' pairs, from the run's own eval data."""
    config = lora_base.read_run_config(workdir)
    rc = read_config(config)
    pairs, _, _ = preference_data.load_pairs(rc, ("eval",), rc.model)
    decode = evaluation.token_decoder(rc.data)
    out = {}
    for r in rows:
        if r["index"] >= len(pairs.get(r["split"], ())):
            raise ValueError(f"eval pair {r['index']} of split {r['split']!r} is not in the "
                             f"run's eval data any more (changed files?)")
        p = pairs[r["split"]][r["index"]]
        out[(r["split"], r["index"])] = {k: decode(p[k]) for k in ("prompt", "chosen",
                                                                   "rejected")}
    return out


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def inspect_run(workdir: str, out: str | None = None, top: int = 10,
                with_text: bool = True) -> dict[str, Any]:
    """Write the report of ``workdir`` (module docstring) to ``out`` (default
    ``workdir/inspect``) and return its numbers (also ``report.json``): ``evals`` (the table),
    ``correlations``, ``top_pairs`` (the last evaluation's ``top`` rows of lowest
    ``chosen_delta``, with ``text`` when ``with_text``), ``plots``."""
    if lora_base.read_run_config(workdir) is None:
        raise FileNotFoundError(f"{os.path.join(workdir, 'config.json')} not found: is "
                                f"{workdir!r} a dpo_jax run directory?")
    train, evals = read_metrics(workdir)
    by_step = eval_pairs.read(workdir)
    if not by_step or not any("ches/mean" in r for r in train + evals):
        raise FileNotFoundError(
            f"{workdir}: no diagnostics (metrics ches/mean, {eval_pairs.SUBDIR}/step_*.jsonl); "
            "rerun with train.diagnostics=True and train.eval_every > 0")
    out = out or os.path.join(workdir, "inspect")
    os.makedirs(out, exist_ok=True)
    last_step = max(by_step)
    last = by_step[last_step]
    key = "chosen_delta" if last and "chosen_delta" in last[0] else "margin"
    worst = sorted(last, key=lambda r: r[key])[:top]
    if with_text and worst:
        texts = _texts(workdir, worst)
        worst = [{**r, "text": texts[(r["split"], r["index"])]} for r in worst]
    report = {"workdir": os.path.abspath(workdir), "eval_step": last_step,
              "evals": [{k: r[k] for k in ("step", *_TABLE) if k in r} for r in evals],
              "correlations": {**correlations(last), **correlations(
                  last, by_step[min(by_step)], f"@{min(by_step)}")},
              "ranked_by": key, "top_pairs": worst,
              "plots": _plots(out, train, evals, last)}
    write_report(out, report, _markdown(report))
    return report


def write_report(directory: str, report: dict, markdown: str) -> None:
    """``report`` as ``directory/report.json`` and ``markdown`` as ``directory/report.md``."""
    with open(os.path.join(directory, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(directory, "report.md"), "w") as f:
        f.write(markdown)


def _markdown(rep: dict) -> str:
    lines = [f"# Likelihood displacement: {rep['workdir']}", "",
             "Diagnostics of `dpo_jax/diagnostics.py` (Razin et al. 2024, arXiv 2410.08847). "
             "Log-prob changes are the policy's summed response log-probs minus the "
             "reference's (nats); CHES from the policy's hidden states.", ""]
    cols = [c for c in ("step", *_TABLE) if any(c in r for r in rep["evals"])]
    lines += ["## Evaluations", "", "| " + " | ".join(cols) + " |",
              "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rep["evals"]]
    lines += ["", f"## Eval pairs at step {rep['eval_step']}", ""]
    lines += [f"* {k}: {v:.3f}" for k, v in rep["correlations"].items()]
    lines += [""] + [f"![{p}]({p})" for p in rep["plots"]]
    lines += ["", f"## The {len(rep['top_pairs'])} pairs whose {rep['ranked_by']} is lowest", ""]
    for r in rep["top_pairs"]:
        vals = ", ".join(f"{k} {_fmt(r[k])}" for k in ("chosen_delta", "rejected_delta",
                                                        "margin", "ches", "ln_ches") if k in r)
        lines += [f"### {r['split']} pair {r['index']}: {vals}", ""]
        for part, text in r.get("text", {}).items():
            lines += [f"**{part}**", "", "```", text, "```", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict[str, Any]:
    """The command line: ``--workdir`` (required), ``--out``, ``--top`` (10), ``--no_text``."""
    ap = argparse.ArgumentParser(prog="python -m dpo_jax.inspect",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="the run directory to report on")
    ap.add_argument("--out", default=None, help="report directory (default WORKDIR/inspect)")
    ap.add_argument("--top", type=int, default=10, help="pairs of largest displacement shown")
    ap.add_argument("--no_text", action="store_true",
                    help="do not decode the top pairs (which reads the run's eval data)")
    args = ap.parse_args(argv)
    rep = inspect_run(args.workdir, args.out, args.top, not args.no_text)
    print(os.path.join(args.out or os.path.join(args.workdir, "inspect"), "report.md"))
    for k, v in rep["correlations"].items():
        print(f"{k}: {v:.3f}")
    return rep


if __name__ == "__main__":
    main()
