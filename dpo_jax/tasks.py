"""``config.task`` -> the function that runs it: ``run(config, workdir) -> summary dict``.

A library task is named here; an experiment outside the library (a project under
``dpo_jax/proj/``, a fork's own module) is named by its config as ``"module:function"``, so the
library never imports it.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

# task name -> "module:function", imported on use so a task's dependencies load only when run.
TASKS: dict[str, str] = {
    "dpo": "dpo_jax.train:train_and_evaluate",
    "sft": "dpo_jax.sft:train_and_evaluate",
    "reward": "dpo_jax.reward_model:train_and_evaluate",
    "ppo": "dpo_jax.ppo.run:train_and_evaluate",
    "online_dpo": "dpo_jax.online:train_and_evaluate",
}


def get_task(name: str) -> Callable[[Any, str], dict]:
    """The task function for a registered name or a ``"module:function"`` path."""
    target = TASKS.get(name, name)
    if ":" not in target:
        raise ValueError(f"config.task={name!r} is not a task; known tasks: {sorted(TASKS)} "
                         "or 'module:function'")
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)
