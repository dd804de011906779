"""Test setup: 8 fake CPU devices so mesh shapes (8,1,1), (1,8,1), (2,2,2) are testable anywhere."""

import inspect
import os
import tempfile

# The concurrency-optimised CPU scheduler lets fake devices reach independent collectives in
# different orders, which deadlocks XLA:CPU's rendezvous on a 2-core machine (seen with FSDP
# all-gathers inside the layer scan); the plain scheduler keeps them in program order.
# The tests run tiny models whose XLA compile time dominates their run time: the backend's
# LLVM optimisation passes are skipped (level 0). They change generated machine code, not
# the HLO program or its floating-point semantics (XLA:CPU fast-math stays off); benchmarks
# (experiments/bench) run outside pytest with the default level.
# XLA:CPU's MLIR fusion emitters are replaced by its older elemental IR emitters
# (--xla_cpu_use_fusion_emitters=false): the same HLO program, emitted straight to LLVM IR; it
# cut the suite's CPU time by 28% and its wall time by 30% (experiments/suite_time/README.md). The
# two emitters round a few fused results differently, so a test that compares two differently
# fused programs bit for bit carries the marker `default_emitters` and runs in a child pytest
# process with XLA's default emitters (pytest_pyfunc_call below).
_ELEMENTAL_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
_DEFAULT_EMITTERS_CHILD = "DPO_JAX_TEST_DEFAULT_EMITTERS"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
    + " --xla_cpu_enable_concurrency_optimized_scheduler=false"
    + " --xla_backend_optimization_level=0"
    + ("" if os.environ.get(_DEFAULT_EMITTERS_CHILD) else " " + _ELEMENTAL_EMITTERS)
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU's thread pools get 4 threads per fake device (32; a PJRT_NPROC or NPROC given is
# kept): a collective blocks its thread until all devices arrive, and with the default
# max(cores, devices) = 8 threads a long context-parallel step deadlocked
# (dpo_jax.distributed.cpu_pool_threads explains; test_main_flags.py checks the pool).
from dpo_jax.distributed import cpu_pool_threads  # noqa: E402  (imports no jax backend)

if (_threads := cpu_pool_threads(os.environ)) is not None:
    os.environ["PJRT_NPROC"] = str(_threads)
# One persistent XLA compilation cache for the whole suite (and its xdist workers): most tests
# build tiny runs that compile the same programs, which then compile once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"dpo_jax_test_xla_cache_{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (multi-process launches, whole "
                          "pipelines, learning runs, benchmarks)")


def pytest_configure(config):
    config.addinivalue_line("markers", "imdb_data: needs the real IMDb parquet files")
    config.addinivalue_line("markers", "torch: compares against PyTorch (transformers, peft); "
                                       "skips without torch. Every test of a module that "
                                       "imports torch at module level carries it: .ci/run "
                                       "reruns `-m torch` after installing the parity extras")
    config.addinivalue_line("markers", "slow: end-to-end test of 20 s or more; runs with "
                                       "--run-slow")
    config.addinivalue_line("markers", "default_emitters: compares two differently fused "
                                       "programs bit for bit; runs in a child pytest process "
                                       "with XLA:CPU's default fusion emitters")


def _imports_torch(item) -> bool:
    """Whether a test needs PyTorch: its module imports torch at module level, or the test
    function imports it itself (``pytest.importorskip("torch")``, ``import torch``). Such a
    test skips in ``.ci/run``'s first pass (no torch), so without the marker the ``-m torch``
    pass would never select it and it would run nowhere."""
    module = getattr(item, "module", None)
    if module is not None and "torch" in vars(module):
        return True
    try:
        source = inspect.getsource(item.function)
    except (AttributeError, OSError, TypeError):
        return False
    return 'importorskip("torch")' in source or "import torch" in source


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _imports_torch(item):
            item.add_marker(pytest.mark.torch)
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow end-to-end test: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

import pytest  # noqa: E402


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    """A test marked ``default_emitters`` runs as ``python -m pytest NODEID`` in a child process
    whose XLA flags keep XLA:CPU's default fusion emitters (the ones a user's run compiles
    with); the test fails with the child's output when the child fails."""
    if pyfuncitem.get_closest_marker("default_emitters") is None or os.environ.get(
            _DEFAULT_EMITTERS_CHILD):
        return None
    import subprocess
    import sys
    # the flags this process runs with (an xdist worker's include the controller's), less the
    # elemental emitters; the child's conftest adds the rest again and not that one
    flags = " ".join(f for f in os.environ["XLA_FLAGS"].split() if f != _ELEMENTAL_EMITTERS)
    env = dict(os.environ, XLA_FLAGS=flags, **{_DEFAULT_EMITTERS_CHILD: "1"})
    env.pop("PYTEST_XDIST_WORKER", None)
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", pyfuncitem.nodeid]
    if pyfuncitem.config.getoption("--run-slow"):
        args.append("--run-slow")
    done = subprocess.run(args, cwd=pyfuncitem.config.rootpath, env=env, capture_output=True,
                          text=True, timeout=600)
    if done.returncode != 0 or " passed" not in done.stdout:
        pytest.fail(f"{pyfuncitem.nodeid} in a child process with XLA's default fusion "
                    f"emitters (exit {done.returncode}):\n{done.stdout[-4000:]}"
                    f"{done.stderr[-2000:]}", pytrace=False)
    return True

from dpo_jax.data.testing import DATA_ENV, data_root  # noqa: E402

SHARED_DATA = data_root()


@pytest.fixture
def shared_data():
    """The real-data root (IMDb, GPT-2 tokenizer, HH): ``$DPO_JAX_DATA``, default
    ``../shared/data`` beside the repository; skips the test when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no real data at {SHARED_DATA} (set ${DATA_ENV} to the data root)")
    return SHARED_DATA
