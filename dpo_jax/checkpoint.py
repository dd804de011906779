"""Orbax checkpoints of a run: policy params, optimizer state, step, data-iterator position.

Orbax writes each step into a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact; ``latest_step`` only sees finished ones.
The frozen reference is not saved: it is rebuilt from the config's reference source (seed, HF
path or another run's checkpoint), which saves a model-sized write per checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

ITEMS = ("params", "opt_state", "data", "meta")


def _abstract(tree, shardings=None):
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )


class Checkpointer:
    """Saves when asked (the loop decides when), keeps the newest ``keep``."""

    def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, data_state: dict) -> bool:
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(params),
            opt_state=ocp.args.StandardSave(opt_state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave({"step": int(step)}),
        )
        return self.manager.save(step, args=args, force=True)

    def restore(self, step: int, params_like, opt_state_like) -> tuple[Any, Any, dict]:
        """Restore into the shardings of ``*_like`` (arrays or ShapeDtypeStructs with sharding)."""
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(_abstract(params_like)),
                opt_state=ocp.args.StandardRestore(_abstract(opt_state_like)),
                data=ocp.args.JsonRestore(),
            ),
        )
        return out["params"], out["opt_state"], out["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(run_dir: str, params_like, step: int | None = None):
    """Policy params of another run (e.g. the SFT run the paper uses as DPO's init and reference).

    ``run_dir`` is that run's workdir (its ``checkpoints/`` is used) or its checkpoint directory.
    """
    directory = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(directory):
        directory = run_dir
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no checkpoint directory at {run_dir!r} (nor {directory!r})")
    manager = ocp.CheckpointManager(
        os.path.abspath(directory), options=ocp.CheckpointManagerOptions(read_only=True),
        item_names=ITEMS,
    )
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{directory!r} holds no finished checkpoint")
    out = manager.restore(
        step, args=ocp.args.Composite(params=ocp.args.StandardRestore(_abstract(params_like)))
    )
    manager.close()
    return out["params"]
