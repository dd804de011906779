"""``config.task`` -> the function that runs it: ``run(config, workdir) -> summary dict``.

A new task registers here; main.py dispatches through this table and knows nothing else.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

# task name -> "module:function", imported on use so a task's dependencies load only when run.
TASKS: dict[str, str] = {
    "dpo": "dpo_jax.train:train_and_evaluate",
    "sft": "dpo_jax.sft:train_and_evaluate",
    "imdb": "dpo_jax.imdb.pipeline:run_pipeline",
    "reward": "dpo_jax.reward_model:train_and_evaluate",
    "ppo": "dpo_jax.ppo.run:train_and_evaluate",
}


def get_task(name: str) -> Callable[[Any, str], dict]:
    if name not in TASKS:
        raise ValueError(f"config.task={name!r} is not a task; known tasks: {sorted(TASKS)}")
    module, function = TASKS[name].split(":")
    return getattr(importlib.import_module(module), function)
