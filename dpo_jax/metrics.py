"""Metric sinks (JSONL, TensorBoard) and the progress line. Process 0 writes; others no-op."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


def _scalar(v: Any) -> float | int:
    v = np.asarray(v)
    return v.item() if v.size == 1 else float(v.mean())


class MetricWriter:
    """Appends one JSON object per record to ``workdir/metrics.jsonl`` and mirrors scalars to
    TensorBoard event files under ``workdir/tb``.

    Resuming at step ``s`` calls :meth:`truncate_after` (``s = 0`` without a checkpoint): records
    past ``s`` are cut from the JSONL and TensorBoard is rebuilt from what remains, so after any
    interruption each step appears once, as in an uninterrupted run. Non-finite values are
    written as they are (``NaN``/``Infinity`` in the JSONL, NaN points in TensorBoard)."""

    def __init__(self, workdir: str, *, enabled: bool | None = None, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb_dir = os.path.join(workdir, "tb")
        self._tensorboard = tensorboard
        self._tb = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._open_tb()

    def _open_tb(self) -> None:
        if self._tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(self.tb_dir, flush_secs=30)

    def records(self) -> list[dict]:
        """The records written so far (empty when there are none)."""
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records with ``step > step`` and rebuild TensorBoard from the rest."""
        if not self.enabled:
            return
        keep = [r for r in self.records() if r.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(tmp, self.path)
        if self._tb is not None:
            self._tb.close()
            shutil.rmtree(self.tb_dir, ignore_errors=True)
            self._open_tb()
            for r in keep:
                self._add_scalars(r)

    def _add_scalars(self, record: dict) -> None:
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                self._tb.add_scalar(k, v, int(record["step"]))

    def write(self, step: int, metrics: Mapping[str, Any], prefix: str = "") -> dict:
        record = {"step": int(step)}
        record.update({prefix + k: _scalar(v) for k, v in metrics.items()})
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self._tb is not None:
                self._add_scalars(record)
        return record

    def flush(self) -> None:
        """Make everything written so far durable in TensorBoard (called at every checkpoint)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class Progress:
    """Tokens/s and ETA over a sliding window of steps (compile time excluded)."""

    def __init__(self, total_steps: int, start_step: int = 0):
        self.total = total_steps
        self.start = start_step
        self._marks: list[tuple[float, int, int]] = []  # (time, step, tokens so far)
        self._tokens = 0

    def update(self, step: int, tokens: int) -> None:
        self._tokens += tokens
        self._marks.append((time.perf_counter(), step, self._tokens))
        self._marks = self._marks[-50:]

    def rates(self) -> tuple[float, float]:
        """(tokens per second, seconds per step) over the window; zeros until two marks."""
        if len(self._marks) < 2:
            return 0.0, 0.0
        (t0, s0, k0), (t1, s1, k1) = self._marks[0], self._marks[-1]
        dt = max(t1 - t0, 1e-9)
        return (k1 - k0) / dt, dt / max(s1 - s0, 1)

    def line(self, step: int, metrics: Mapping[str, Any]) -> str:
        tps, sps = self.rates()
        eta = sps * (self.total - step)
        m, s = divmod(int(eta), 60)
        parts = [f"step {step}/{self.total}"]
        for key, label in (("loss", "loss"), ("rewards/accuracies", "acc"),
                           ("rewards/margins", "margin"), ("grad_norm", "gnorm")):
            if key in metrics:
                parts.append(f"{label} {_scalar(metrics[key]):.4f}")
        parts.append(f"{tps:,.0f} tok/s")
        parts.append(f"ETA {m}m{s:02d}s")
        return " | ".join(parts)
