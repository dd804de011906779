"""Where real pretrained checkpoints live on this machine: ``$DPO_JAX_MODELS``, else
``~/.cache/dpo_jax`` (the default output of ``../shared/models/smollm2.sh``).

Configs call :func:`local_model` when they are read (run time), so no machine path is written
into a config file; tests call :func:`find_local_model` and skip when it returns None.
"""

from __future__ import annotations

import os
import pathlib

MODELS_ENV = "DPO_JAX_MODELS"
SMOLLM2 = "smollm2-135m-instruct"  # written by ../shared/models/smollm2.sh


def models_root() -> pathlib.Path:
    """``$DPO_JAX_MODELS`` when set, else ``~/.cache/dpo_jax``; the directory may not exist."""
    env = os.environ.get(MODELS_ENV)
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "dpo_jax"


def local_model(name: str) -> str:
    """The Hugging Face directory ``name`` under :func:`models_root` (a string path; it may
    not exist: importing it then fails naming the path)."""
    return str(models_root() / name)


def find_local_model(name: str) -> str | None:
    """:func:`local_model` when it holds ``config.json`` and ``model.safetensors``, else None."""
    path = pathlib.Path(local_model(name))
    ok = (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    return str(path) if ok else None
