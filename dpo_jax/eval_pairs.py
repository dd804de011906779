"""Per-pair values of each evaluation, on disk: ``workdir/eval_pairs/step_<step>.jsonl``.

With ``train.diagnostics`` the DPO eval step returns, beside its metrics, the per-pair values of
``dpo_jax.diagnostics.per_pair`` (``eval_metrics.PER_EXAMPLE``). :class:`EvalPairs` collects
them during an evaluation and writes one JSON line per real (weight > 0) eval pair::

    {"step": 100, "split": "eval", "index": 17, "weight": 1.0, "chosen_logps": -41.2,
     "rejected_logps": -50.3, "chosen_delta": -0.8, "rejected_delta": -2.1, "margin": 0.13,
     "ches": 12.5, "ln_ches": -0.04}

``index`` is the pair's position in its eval split (eval batches are served in file order,
``data.stream.BatchStream``), so ``preference_data.load_pairs`` gives its tokens back
(``dpo_jax/inspect.py``). One file per evaluated step: a resumed run that evaluates a step
again rewrites that step's file whole, so nothing needs cutting back on resume. It also adds
the quantiles of CHES and ln-CHES over the split to the eval metrics (``ches/q50``, ...).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Callable, Mapping

import jax
import numpy as np

from dpo_jax.diagnostics import QUANTILES

SUBDIR = "eval_pairs"
_FILE = re.compile(r"step_(\d+)\.jsonl$")


def quantiles(rows: list[dict], names=("ches", "ln_ches"), qs=QUANTILES) -> dict[str, float]:
    """``{'<name>/q<100 q>': value}``: numpy's (linear) quantiles of each value over ``rows``
    (unweighted; the rows are the real pairs). Empty when there are no rows."""
    if not rows:
        return {}
    out = {}
    for name in names:
        values = np.asarray([r[name] for r in rows], np.float64)
        for q in qs:
            out[f"{name}/q{round(100 * q):02d}"] = float(np.quantile(values, q))
    return out


class EvalPairs:
    """Collects one evaluation's per-pair values and writes them (see the module docstring).

    ``run_path``: the run's workdir; ``streams``: the run's data streams ``{split: stream}``
    (the eval ones, ``'eval'`` and a mixture's ``'eval/<name>'``, are recognised by identity
    when :func:`dpo_jax.loop.eval_totals` asks for their :meth:`sink`)."""

    def __init__(self, run_path: str, streams: Mapping[str, Any]):
        self.directory = os.path.join(run_path, SUBDIR)
        self._names = {id(s): k for k, s in streams.items() if s is not None}
        self._rows: list[dict] = []
        self._offset: dict[str, int] = {}

    def sink(self, batches) -> Callable[[dict], None]:
        """The per-example sink of the eval stream ``batches``: takes one batch's host arrays
        ``{name: [B]}`` at a time, in order, and keeps the rows of weight > 0."""
        split = self._names.get(id(batches), "eval")

        def add(values: Mapping[str, np.ndarray]) -> None:
            arrays = {k: np.asarray(v, np.float64) for k, v in values.items()}
            n = len(arrays["weight"])
            start = self._offset.get(split, 0)
            self._offset[split] = start + n
            for i in np.flatnonzero(arrays["weight"] > 0):
                self._rows.append({"split": split, "index": int(start + i),
                                   **{k: float(a[i]) for k, a in arrays.items()}})

        return add

    def wrap(self, evaluate: Callable | None) -> Callable | None:
        """``evaluate(state) -> metrics`` that also writes this evaluation's file and adds
        :func:`quantiles` to the metrics; None stays None."""
        if evaluate is None:
            return None

        def run(state) -> dict[str, float]:
            self._rows, self._offset = [], {}
            metrics = dict(evaluate(state))
            metrics.update(quantiles(self._rows))
            self.write(int(jax.device_get(state.step)), self._rows)
            return metrics

        return run

    def write(self, step: int, rows: list[dict]) -> str:
        """Write ``rows`` as ``step_<step>.jsonl`` (process 0; atomic) and return its path."""
        path = os.path.join(self.directory, f"step_{step:08d}.jsonl")
        if jax.process_index() == 0:
            os.makedirs(self.directory, exist_ok=True)
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps({"step": step, **r}) + "\n" for r in rows)
            os.replace(tmp, path)
        return path


def read(workdir: str) -> dict[int, list[dict]]:
    """``{step: rows}`` of every ``eval_pairs/step_<step>.jsonl`` in ``workdir``, by step
    (empty when the run wrote none)."""
    directory = os.path.join(workdir, SUBDIR)
    out: dict[int, list[dict]] = {}
    if not os.path.isdir(directory):
        return out
    for name in sorted(os.listdir(directory)):
        m = _FILE.match(name)
        if m:
            with open(os.path.join(directory, name)) as f:
                out[int(m.group(1))] = [json.loads(line) for line in f if line.strip()]
    return dict(sorted(out.items()))
