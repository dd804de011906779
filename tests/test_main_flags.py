"""``python -m dpo_jax.main`` sets XLA's CPU scheduler flag, and with several fake CPU devices
the size of XLA:CPU's thread pools (PJRT_NPROC), in ``main()``, before jax initialises its
backends; importing the module changes no environment variable."""

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
    threads = {"PJRT_NPROC": str(max(os.cpu_count(), 8))} if "count=2" in given else {}
    assert env == {"XLA_FLAGS": want, **threads}


def test_fake_cpu_devices_get_four_pool_threads_each_unless_set():
    """PJRT_NPROC (XLA:CPU's intra-op and dispatch pools) is max(cores, 4 x the fake devices)
    with several fake devices; one device, or a PJRT_NPROC / NPROC of the user's, sets none;
    the device count is the last one in XLA_FLAGS."""
    count = lambda n: f"--xla_force_host_platform_device_count={n}"  # noqa: E731
    threads = main_lib.cpu_pool_threads
    assert main_lib.CPU_THREADS_PER_DEVICE == 4
    assert threads({"XLA_FLAGS": f"--xla_cpu_x=1 {count(8)}"}, cores=2) == 32
    assert threads({"XLA_FLAGS": count(8)}, cores=64) == 64
    assert threads({"XLA_FLAGS": f"{count(8)} {count(2)}"}, cores=2) == 8
    assert threads({"XLA_FLAGS": count(1)}, cores=2) is None
    assert threads({}, cores=2) is None
    assert threads({"XLA_FLAGS": count(8), "PJRT_NPROC": "3"}, cores=2) is None
    assert threads({"XLA_FLAGS": count(8), "NPROC": "3"}, cores=2) is None
    assert main_lib.host_device_count("") == 1
    env = {"XLA_FLAGS": count(8), "NPROC": "3"}
    main_lib.set_xla_flags(env)
    assert "PJRT_NPROC" not in env


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="thread names from Linux /proc")
def test_the_suite_runs_xla_cpu_with_four_pool_threads_per_fake_device():
    """tests/conftest.py's PJRT_NPROC reaches XLA: its intra-op pool (threads named
    tf_XLAEigen) has that many threads, at least 4 per fake device. With XLA's default of
    max(cores, devices) a long context-parallel step deadlocked (dpo_jax.distributed); the
    hang depends on timing, this check does not."""
    import jax

    assert jax.device_count() == 8
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                names.append(f.read().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    want = int(os.environ["PJRT_NPROC"])
    assert names.count("tf_XLAEigen") == want
    assert want >= main_lib.CPU_THREADS_PER_DEVICE * jax.device_count(), (
        "PJRT_NPROC given below 4 threads per fake device")


def report_flags(config, workdir):
    """A task for the subprocess below: what the run sees once main() has started it."""
    import jax

    return {"xla_flags": os.environ.get("XLA_FLAGS"), "devices": jax.device_count(),
            "pjrt_nproc": os.environ.get("PJRT_NPROC")}


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
        env=dict({k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC")},
                 PYTHONPATH=REPO, XLA_FLAGS=given))
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.split("SEEN ", 1)[1])
    assert seen == {"at_import": given, "backends_initialised_before": False}
    summary = json.loads(done.stdout.split("SEEN ", 1)[0])["summary"]
    assert summary == {"xla_flags": f"{given} {FLAG}", "devices": 2,
                       "pjrt_nproc": str(max(os.cpu_count(), 8))}


def test_the_suite_compiles_with_the_elemental_emitters():
    """tests/conftest.py: the suite's own XLA flags replace XLA:CPU's fusion emitters (compile
    time) and keep the 8 fake devices."""
    flags = os.environ["XLA_FLAGS"].split()
    assert "--xla_cpu_use_fusion_emitters=false" in flags
    assert "--xla_force_host_platform_device_count=8" in flags


@pytest.mark.default_emitters
def test_a_default_emitters_test_runs_in_a_child_with_xlas_default_emitters():
    """The marker `default_emitters` (tests/conftest.py): the test body runs in a child pytest
    process whose flags keep XLA's default fusion emitters and the 8 fake devices."""
    import jax
    flags = os.environ["XLA_FLAGS"].split()
    assert os.environ.get("DPO_JAX_TEST_DEFAULT_EMITTERS") == "1"
    assert not any("fusion_emitters" in f for f in flags)
    assert "--xla_force_host_platform_device_count=8" in flags
    assert jax.device_count() == 8
