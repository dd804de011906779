"""Orbax checkpoints of a run: parameters, optimizer state and JSON items (data position, ...).

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact. A checkpoint that is complete on disk
but damaged afterwards (a failing disk, a truncated copy) is skipped on restore: ``restore``
walks back from the newest step to the newest one that restores, moves the damaged ones aside
to ``<directory>.damaged/`` (nothing is deleted) and says so in one line each.

A frozen reference is not saved: it is rebuilt from the config's reference source (seed, HF
path or another run's checkpoint), which saves a model-sized write per checkpoint. Likewise a
LoRA run (``dpo_jax/lora.py``) saves its adapters as ``params`` and their optimizer state, not
its frozen base; the base's fingerprint (the ``lora_base`` JSON item) is checked on restore. A reference
that changes during training (TR-DPO, ``train.ref_sync_every``) is saved as the ``ref_params``
item (``Checkpointer(ref_item=True)``).
"""

from __future__ import annotations

import logging as py_logging
import os
import shutil
from typing import Any

import orbax.checkpoint as ocp
from absl import logging

from dpo_jax.train_state import abstract

ARRAY_ITEMS = ("params", "opt_state")
REF_ITEM = "ref_params"


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
    dict, e.g. ``data`` = the batch stream's position, ``kl_controller`` = PPO's coefficient).
    ``ref_item``: the reference parameters are saved and restored too (a reference that
    changes during training, TR-DPO)."""

    def __init__(self, directory: str, *, json_items: tuple[str, ...] = ("data",), keep: int = 2,
                 async_save: bool = True, ref_item: bool = False):
        self.directory = os.path.abspath(directory)
        self.json_items = tuple(json_items)
        self.ref_item = bool(ref_item)
        self._options = dict(max_to_keep=keep, create=True, cleanup_tmp_directories=True,
                             enable_async_checkpointing=async_save)
        self.manager = self._open()

    def _open(self):
        return ocp.CheckpointManager(self.directory,
                                     options=ocp.CheckpointManagerOptions(**self._options),
                                     item_names=self._array_items + self.json_items)

    @property
    def _array_items(self) -> tuple[str, ...]:
        return ARRAY_ITEMS + ((REF_ITEM,) if self.ref_item else ())

    def steps(self) -> list[int]:
        """Finished checkpoint steps, oldest first."""
        return sorted(self.manager.all_steps())

    def save(self, step: int, params, opt_state, json_states: dict[str, dict],
             ref_params=None) -> bool:
        """Save step ``step``; ``ref_params`` is required exactly when ``ref_item``."""
        if set(json_states) != set(self.json_items):
            raise ValueError(f"json states {sorted(json_states)} != items {self.json_items}")
        if (ref_params is not None) != self.ref_item:
            raise ValueError(f"ref_params {'missing' if self.ref_item else 'given'}: this "
                             f"checkpointer was opened with ref_item={self.ref_item}")
        args = {"params": ocp.args.StandardSave(params),
                "opt_state": ocp.args.StandardSave(opt_state)}
        if self.ref_item:
            args[REF_ITEM] = ocp.args.StandardSave(ref_params)
        args.update({k: ocp.args.JsonSave(v) for k, v in json_states.items()})
        return self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def _restore_step(self, step: int, params_like, opt_state_like, ref_params_like):
        arrays = {"params": ocp.args.StandardRestore(abstract(params_like)),
                  "opt_state": ocp.args.StandardRestore(abstract(opt_state_like))}
        if self.ref_item:
            arrays[REF_ITEM] = ocp.args.StandardRestore(abstract(ref_params_like))
        out = self.manager.restore(step, args=ocp.args.Composite(
            **arrays, **{k: ocp.args.JsonRestore() for k in self.json_items}))
        return (out["params"], out["opt_state"], {k: out[k] for k in self.json_items},
                out[REF_ITEM] if self.ref_item else None)

    def restore(self, params_like, opt_state_like, ref_params_like=None
                ) -> tuple[int, Any, Any, dict, Any] | None:
        """``(step, params, opt_state, json_states, ref_params)`` of the newest checkpoint that
        restores into the shardings of ``*_like``, or None when there is none; ``ref_params``
        is None unless ``ref_item`` (then ``ref_params_like`` is required).

        Raises CheckpointError when checkpoints exist but none restores."""
        if self.ref_item and ref_params_like is None:
            raise ValueError("ref_params_like is required: this checkpointer has ref_item=True")
        steps = self.steps()
        failures = []
        for step in reversed(steps):
            try:
                with _Quiet():
                    return (step, *self._restore_step(step, params_like, opt_state_like,
                                                      ref_params_like))
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


def _restore_item(run_dir: str, name: str, arg, step: int | None):
    """Item ``name`` of another run's checkpoint ``step`` (None: the newest), restored with the
    orbax ``arg``. Raises FileNotFoundError when there is no finished checkpoint."""
    directory = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(directory):
        directory = run_dir
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory at {run_dir!r} (nor {directory!r})")
    manager = ocp.CheckpointManager(
        os.path.abspath(directory), options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory!r} holds no finished checkpoint")
        if not os.path.isdir(os.path.join(directory, str(step), name)):
            return None
        return manager.restore(step, args=ocp.args.Composite(**{name: arg}))[name]
    finally:
        manager.close()


def restore_params(run_dir: str, params_like, step: int | None = None):
    """Policy params of another run (e.g. the SFT run the paper uses as DPO's init and reference):
    its ``params`` item (a LoRA run's: its adapters).

    ``run_dir`` is that run's workdir (its ``checkpoints/`` is used) or its checkpoint directory.
    Raises FileNotFoundError when there is no finished checkpoint."""
    out = _restore_item(run_dir, "params", ocp.args.StandardRestore(abstract(params_like)), step)
    if out is None:
        raise FileNotFoundError(f"{run_dir!r}: the checkpoint holds no params item")
    return out


def restore_json_item(run_dir: str, name: str, step: int | None = None) -> dict | None:
    """JSON item ``name`` (e.g. a LoRA run's ``lora_base`` fingerprint) of another run's
    newest (or ``step``'s) checkpoint; None when that checkpoint has no such item."""
    return _restore_item(run_dir, name, ocp.args.JsonRestore(), step)
