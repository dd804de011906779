"""Orbax checkpoints of a run: parameters, optimizer state and JSON items (data position, ...).

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact. A checkpoint that is complete on disk
but damaged afterwards (a failing disk, a truncated copy) is skipped on restore: ``restore``
walks back from the newest step to the newest one that restores, moves the damaged ones aside
to ``<directory>.damaged/`` (nothing is deleted) and says so in one line each.

The frozen reference is not saved: it is rebuilt from the config's reference source (seed, HF
path or another run's checkpoint), which saves a model-sized write per checkpoint.
"""

from __future__ import annotations

import logging as py_logging
import os
import shutil
from typing import Any

import orbax.checkpoint as ocp
from absl import logging

from dpo_jax.state import abstract

ARRAY_ITEMS = ("params", "opt_state")


class CheckpointError(RuntimeError):
    """No checkpoint in a directory restores."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200] if text else ''}"


class _Quiet:
    """Silences orbax's and asyncio's error logging while a damaged checkpoint is tried (the
    failure is reported in one line by ``restore``)."""

    names = ("absl", "asyncio", "orbax", "jax")

    def __enter__(self):
        self.levels = {n: py_logging.getLogger(n).level for n in self.names}
        for n in self.names:
            py_logging.getLogger(n).setLevel(py_logging.CRITICAL)

    def __exit__(self, *exc):
        for n, level in self.levels.items():
            py_logging.getLogger(n).setLevel(level)


class Checkpointer:
    """Saves when asked (the loop decides when), keeps the newest ``keep``.

    ``json_items`` name the host-side states saved with every checkpoint (each a JSON-able
    dict, e.g. ``data`` = the batch stream's position, ``kl_controller`` = PPO's coefficient)."""

    def __init__(self, directory: str, *, json_items: tuple[str, ...] = ("data",), keep: int = 2,
                 async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.json_items = tuple(json_items)
        self._options = dict(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                             enable_async_checkpointing=async_save)
        self.manager = self._open()

    def _open(self):
        return ocp.CheckpointManager(self.directory,
                                     options=ocp.CheckpointManagerOptions(**self._options),
                                     item_names=ARRAY_ITEMS + self.json_items)

    def steps(self) -> list[int]:
        """Finished checkpoint steps, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, params, opt_state, json_states: dict[str, dict]) -> bool:
        if set(json_states) != set(self.json_items):
            raise ValueError(f"json states {sorted(json_states)} != items {self.json_items}")
        args = {"params": ocp.args.StandardSave(params),
                "opt_state": ocp.args.StandardSave(opt_state)}
        args.update({k: ocp.args.JsonSave(v) for k, v in json_states.items()})
        return self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def _restore_step(self, step: int, params_like, opt_state_like):
        out = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract(params_like)),
            opt_state=ocp.args.StandardRestore(abstract(opt_state_like)),
            **{k: ocp.args.JsonRestore() for k in self.json_items}))
        return out["params"], out["opt_state"], {k: out[k] for k in self.json_items}

    def restore(self, params_like, opt_state_like) -> tuple[int, Any, Any, dict] | None:
        """``(step, params, opt_state, json_states)`` of the newest checkpoint that restores
        into the shardings of ``*_like``, or None when there is none.

        Raises CheckpointError when checkpoints exist but none restores."""
        steps = self.steps()
        failures = []
        for step in reversed(steps):
            try:
                with _Quiet():
                    return (step, *self._restore_step(step, params_like, opt_state_like))
            except Exception as e:  # noqa: BLE001 - any damage: report and walk back
                failures.append((step, _first_line(e)))
                moved = self._move_aside(step)
                logging.warning("checkpoint step %d of %s does not restore (%s); moved to %s; "
                                "trying the previous one", step, self.directory, failures[-1][1],
                                moved)
        if failures:
            raise CheckpointError(
                f"no checkpoint in {self.directory} restores (tried steps "
                f"{[s for s, _ in failures]}: {failures[0][1]}); they were moved to "
                f"{self.directory}.damaged/. Start over with another --workdir, or restore the "
                "files from a backup.")
        return None

    def _move_aside(self, step: int) -> str:
        """Move a damaged step out of orbax's sight, so a later save of that step can succeed."""
        src = os.path.join(self.directory, str(step))
        dst_dir = self.directory + ".damaged"
        os.makedirs(dst_dir, exist_ok=True)
        dst = os.path.join(dst_dir, str(step))
        n = 1
        while os.path.exists(dst):
            dst, n = os.path.join(dst_dir, f"{step}.{n}"), n + 1
        if os.path.exists(src):
            shutil.move(src, dst)
        self.manager.close()
        self.manager = self._open()  # forget the step it listed
        return dst

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(run_dir: str, params_like, step: int | None = None):
    """Policy params of another run (e.g. the SFT run the paper uses as DPO's init and reference).

    ``run_dir`` is that run's workdir (its ``checkpoints/`` is used) or its checkpoint directory.
    Raises FileNotFoundError when there is no finished checkpoint."""
    directory = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(directory):
        directory = run_dir
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory at {run_dir!r} (nor {directory!r})")
    manager = ocp.CheckpointManager(
        os.path.abspath(directory), options=ocp.CheckpointManagerOptions(read_only=True))
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{directory!r} holds no finished checkpoint")
    out = manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract(params_like))))
    manager.close()
    return out["params"]
