"""``config.task`` -> the function that runs it: ``run(config, workdir) -> summary dict``, and
the reader of the task's own config block.

A library task is named here; an experiment outside the library (a project under
``dpo_jax/proj/``, a fork's own module) is named by its config as ``"module:function"``, so the
library never imports it. A task with a config block of its own declares it beside the task (a
frozen dataclass, its defaults and checks: ``sft_config.py``, ``online_config.py``,
``ppo/config.py``) and names its reader in :data:`TASK_BLOCKS`; ``config.read_config`` calls it
once and the task reads the result as ``rc.task_block``.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from dpo_jax.online_config import read_online
from dpo_jax.ppo.config import read_ppo
from dpo_jax.sft_config import read_sft

# task name -> "module:function", imported on use so a task's dependencies load only when run.
TASKS: dict[str, str] = {
    "dpo": "dpo_jax.train:train_and_evaluate",
    "sft": "dpo_jax.sft:train_and_evaluate",
    "reward": "dpo_jax.reward_model:train_and_evaluate",
    "ppo": "dpo_jax.ppo.run:train_and_evaluate",
    "online_dpo": "dpo_jax.online:train_and_evaluate",
}

# task name -> reader of its own block: fn(run config) -> frozen dataclass (ValueError naming
# the field); tasks absent here have none (rc.task_block is None).
TASK_BLOCKS: dict[str, Callable[[Any], Any]] = {
    "sft": read_sft,
    "ppo": read_ppo,
    "online_dpo": read_online,
}


def get_task(name: str) -> Callable[[Any, str], dict]:
    """The task function for a registered name or a ``"module:function"`` path."""
    target = TASKS.get(name, name)
    if ":" not in target:
        raise ValueError(f"config.task={name!r} is not a task; known tasks: {sorted(TASKS)} "
                         "or 'module:function'")
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)
