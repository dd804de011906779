"""Entry point: ``python -m dpo_jax.main --config=configs/<name>.py[:variant] --workdir=DIR``.

With no ``--config`` it runs the offline default (DPO on the synthetic task, CPU, minutes).
Fields are overridden on the command line, e.g. ``--config.loss.beta=0.5``.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from dpo_jax.distributed import set_xla_flags

# The default is the offline default's own file (dpo_jax/config.py:get_config), so field
# overrides such as --config.loss.beta=0.5 exist with or without --config=.
_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Config file (optionally :variant); default: the offline default.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config.json, checkpoints, metrics.")
# Multi-host (see dpo_jax/distributed.py and docs/scale.md): TPU pods and SLURM are detected;
# elsewhere give all three (or DPO_JAX_COORDINATOR / DPO_JAX_NUM_PROCESSES / DPO_JAX_PROCESS_ID).
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process' index in [0, num_processes).")


def quiet_library_logs() -> None:
    """orbax logs every checkpoint phase at INFO through absl; keep the run's own lines readable."""
    import logging as py_logging

    def keep(record: py_logging.LogRecord) -> bool:
        noisy = "/orbax/" in record.pathname or "xla_bridge" in record.pathname
        return record.levelno >= py_logging.WARNING or not noisy

    logging.get_absl_handler().addFilter(keep)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    set_xla_flags()
    import jax

    from dpo_jax import distributed

    quiet_library_logs()
    distributed.initialize(distributed.plan_initialization(
        os.environ, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value))

    from dpo_jax.tasks import get_task

    config = _CONFIG.value
    workdir = _WORKDIR.value or "runs/default"
    logging.info("devices: %s (process %d of %d)", jax.devices(), jax.process_index(),
                 jax.process_count())
    summary = get_task(config.task)(config, workdir)
    if jax.process_index() == 0:
        print(json.dumps({"summary": summary}, indent=2))


if __name__ == "__main__":
    app.run(main)
