"""``python -m dpo_jax.main`` sets XLA's CPU scheduler flag in ``main()``, before jax initialises
its backends, and importing the module changes no environment variable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dpo_jax import distributed as main_lib  # the flag helpers main() calls

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


@pytest.mark.parametrize("given,want", [
    ("", FLAG),
    ("--xla_force_host_platform_device_count=2",
     f"--xla_force_host_platform_device_count=2 {FLAG}"),
    ("--xla_cpu_enable_concurrency_optimized_scheduler=true",  # the user's choice is kept
     "--xla_cpu_enable_concurrency_optimized_scheduler=true"),
    (FLAG, FLAG),
])
def test_the_flag_is_appended_once_and_an_explicit_setting_kept(given, want):
    assert main_lib.CPU_SCHEDULER_FLAG == FLAG
    assert main_lib.xla_flags(given) == want
    env = {"XLA_FLAGS": given}
    main_lib.set_xla_flags(env)
    assert env == {"XLA_FLAGS": want}


def report_flags(config, workdir):
    """A task for the subprocess below: what the run sees once main() has started it."""
    import jax

    return {"xla_flags": os.environ.get("XLA_FLAGS"), "devices": jax.device_count()}


# main() is run as `python -m dpo_jax.main` would, with set_xla_flags wrapped to record the
# environment at import time and whether jax's backends were initialised when it ran.
_DRIVER = """
import json, os, sys
from absl import app
from jax._src import xla_bridge
import dpo_jax.main as m
seen = {"at_import": os.environ.get("XLA_FLAGS")}
original = m.set_xla_flags
def spy(*args):
    seen["backends_initialised_before"] = xla_bridge.backends_are_initialized()
    original(*args)
m.set_xla_flags = spy
try:
    app.run(m.main, argv=["dpo_jax.main"] + sys.argv[1:])
finally:
    print("SEEN " + json.dumps(seen))
"""


def test_main_sets_the_flag_before_jax_initialises_its_backends(tmp_path):
    given = "--xla_force_host_platform_device_count=2"
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER, "--config=configs/default.py",
         "--config.task=tests.test_main_flags:report_flags", f"--workdir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=given))
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.split("SEEN ", 1)[1])
    assert seen == {"at_import": given, "backends_initialised_before": False}
    summary = json.loads(done.stdout.split("SEEN ", 1)[0])["summary"]
    assert summary == {"xla_flags": f"{given} {FLAG}", "devices": 2}
