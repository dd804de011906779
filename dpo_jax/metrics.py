"""Metric sinks (JSONL, TensorBoard, optionally Weights & Biases) and the progress line.
Process 0 writes; others no-op."""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np


WANDB_INSTALL = 'pip install -e ".[wandb]"'


def wandb_settings(workdir: str) -> dict[str, str]:
    """The ``log`` block of ``workdir/config.json`` (the run's config): ``wandb_project`` ('' =
    off), ``wandb_entity``, ``wandb_name``; empty when the file or the block is absent."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        log = json.load(f).get("log") or {}
    return {k: str(log.get(k) or "") for k in ("wandb_project", "wandb_entity", "wandb_name")}


class WandbSink:
    """One W&B run per workdir: the run's config, every metrics record at its step, files
    (e.g. a plot) as images.

    The run id is kept in ``workdir/wandb_run_id``, so a resumed run continues the same W&B
    run (W&B keeps steps increasing: records at or below a step it already has, rewritten
    after a resume cut the JSONL back, are dropped by W&B; metrics.jsonl stays the reference).
    ``WANDB_MODE=offline`` / ``WANDB_DIR`` work as W&B documents (the files go under
    ``workdir`` unless ``WANDB_DIR`` is set). Raises ``ImportError`` saying how to install
    the extra when ``wandb`` is missing."""

    def __init__(self, workdir: str, project: str, *, entity: str = "", name: str = "",
                 config: Mapping[str, Any] | None = None):
        try:
            import wandb
        except ImportError as e:
            raise ImportError(f"log.wandb_project={project!r} needs wandb: {WANDB_INSTALL} "
                              "(or set log.wandb_project='')") from e
        self._wandb = wandb
        id_path = os.path.join(workdir, "wandb_run_id")
        if os.path.exists(id_path):
            with open(id_path) as f:
                run_id = f.read().strip()
        else:
            run_id = uuid.uuid4().hex[:12]
            os.makedirs(workdir, exist_ok=True)
            with open(id_path, "w") as f:
                f.write(run_id + "\n")
        self.run = wandb.init(project=project, entity=entity or None,
                              name=name or os.path.basename(os.path.abspath(workdir)),
                              id=run_id, resume="allow", config=dict(config or {}),
                              dir=os.environ.get("WANDB_DIR") or workdir)

    def log(self, record: Mapping[str, Any]) -> None:
        """A metrics record (``step`` and scalars) at its step."""
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        self.run.log(values, step=int(record["step"]))

    def log_image(self, key: str, path: str, step: int | None = None) -> None:
        """The image file ``path`` (e.g. a plot) under ``key``."""
        self.run.log({key: self._wandb.Image(path)}, step=step)

    def close(self) -> None:
        self.run.finish()


def wandb_sink(workdir: str) -> WandbSink | None:
    """A ``WandbSink`` for ``workdir`` when its config.json sets ``log.wandb_project``, on
    process 0 only; else None."""
    settings = wandb_settings(workdir)
    if jax.process_index() != 0 or not settings.get("wandb_project"):
        return None
    with open(os.path.join(workdir, "config.json")) as f:
        config = json.load(f)
    return WandbSink(workdir, settings["wandb_project"], entity=settings["wandb_entity"],
                     name=settings["wandb_name"], config=config)


def _scalar(v: Any) -> float | int:
    v = np.asarray(v)
    return v.item() if v.size == 1 else float(v.mean())


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL log (``metrics.jsonl``, ``samples.jsonl``): one JSON object a
    non-blank line; ``[]`` when the file does not exist (yet)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricWriter:
    """Appends one JSON object per record to ``workdir/metrics.jsonl`` and mirrors scalars to
    TensorBoard event files under ``workdir/tb`` and, when the run's ``config.json`` in
    ``workdir`` sets ``log.wandb_project``, to Weights & Biases (:class:`WandbSink`; ``wandb``
    False turns it off).

    Resuming at step ``s`` calls :meth:`truncate_after` (``s = 0`` without a checkpoint): records
    past ``s`` are cut from the JSONL and TensorBoard is rebuilt from what remains, so after any
    interruption each step appears once, as in an uninterrupted run. Non-finite values are
    written as they are (``NaN``/``Infinity`` in the JSONL, NaN points in TensorBoard)."""

    def __init__(self, workdir: str, *, enabled: bool | None = None, tensorboard: bool = True,
                 wandb: bool = True):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self.tb_dir = os.path.join(workdir, "tb")
        self._tensorboard = tensorboard
        self._tb = None
        self.wandb: WandbSink | None = None
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            self._open_tb()
            if wandb:
                self.wandb = wandb_sink(workdir)

    def _open_tb(self) -> None:
        if self._tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(self.tb_dir, flush_secs=30)

    def records(self) -> list[dict]:
        """The records written so far (empty when there are none)."""
        return read_records(self.path)

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
            if self.wandb is not None:
                self.wandb.log(record)
        return record

    def flush(self) -> None:
        """Make everything written so far durable in TensorBoard (called at every checkpoint)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self.wandb is not None:
            self.wandb.close()
            self.wandb = None


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

    def last_step_s(self) -> float:
        """Wall seconds between the last two marks per step between them (0 until two marks):
        one step's time, including an evaluation or checkpoint that ran in between."""
        if len(self._marks) < 2:
            return 0.0
        (t0, s0, _), (t1, s1, _) = self._marks[-2], self._marks[-1]
        return (t1 - t0) / max(s1 - s0, 1)

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
