"""Real multi-process runs on localhost (gloo CPU collectives, 4 fake devices per process):
the mesh's host layout, 2 processes x 4 devices == 1 process x 8 devices, and a run that gets
SIGTERM in one process checkpoints in both, exits 0, and resumes to the uninterrupted result."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow  # real multi-process launches: run with --run-slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch.sh")
TIMEOUT = 400
STEPS = 6

# A tiny model and data set: the point is the process layout, not learning.
ARGS = [
    "--config=configs/default.py", f"--config.train.steps={STEPS}", "--config.train.eval_every=0",
    "--config.train.log_every=1", "--config.train.checkpoint_every=0",
    "--config.train.batch_size=16", "--config.train.async_checkpointing=False",
    "--config.model.overrides.n_layer=1", "--config.model.overrides.d_model=32",
    "--config.model.overrides.n_head=2", "--config.model.overrides.d_ff=64",
    "--config.data.synthetic.num_train=256", "--config.data.synthetic.num_eval=32",
]


_CACHE = {}


@pytest.fixture(scope="module", autouse=True)
def _compile_cache(tmp_path_factory):
    """One persistent XLA cache for this module's runs: the interrupted and resumed runs reuse
    the full run's executables (same programs, so the same numbers), which saves compile time."""
    _CACHE["dir"] = str(tmp_path_factory.mktemp("xla_cache"))
    yield
    _CACHE.clear()


def _env():
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("XLA_FLAGS", None)  # launch.sh sets the device count and the scheduler flag
    if "dir" in _CACHE:
        env.update(JAX_COMPILATION_CACHE_DIR=_CACHE["dir"],
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _start(workdir, n, per):
    out, err = open(f"{workdir}.out", "w"), open(f"{workdir}.err", "w")
    proc = subprocess.Popen(
        ["bash", LAUNCH, "local", str(n), "--devices-per-process", str(per), "--", *ARGS,
         f"--workdir={workdir}"],
        cwd=REPO, env=_env(), stdout=out, stderr=err, start_new_session=True)
    return proc


def _finish(proc, workdir):
    """Wait; on timeout kill the launcher's process group (it and the processes it started)."""
    try:
        rc = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    assert rc == 0, open(f"{workdir}.err").read()[-4000:]


def _launch(workdir, n, per):
    _finish(_start(workdir, n, per), workdir)
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def _same_keys(record):
    # wall-clock dependent
    return {k: v for k, v in record.items() if k not in ("tokens_per_s", "iteration_s")}


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("mp") / "two")
    return workdir, _launch(workdir, 2, 4)


def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path, two_process_run):
    workdir, two = two_process_run
    one = _launch(str(tmp_path / "one"), 1, 8)
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, STEPS + 1))
    for a, b in zip(two, one):
        for k in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
            # Cross-process sums run through gloo in another order: equal to float32 rounding.
            assert a[k] == pytest.approx(b[k], rel=2e-6, abs=1e-7), (a["step"], k)
        # The margin is beta times a difference of ~50-nat log-prob sums: its rounding is
        # absolute, about beta * 50 * 2**-23 per sum, not relative to its (small) value.
        scale = 0.1 * max(abs(a["logps/chosen"]), abs(a["logps/rejected"]))
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], abs=8 * scale * 2**-23)
    assert two[-1]["loss"] != two[0]["loss"]  # it trained
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["stopped_at"] is None and summary["steps"] == STEPS
    # Process 0 alone writes the progress lines.
    err = open(f"{workdir}.err").read()
    assert len(re.findall(r"step 3/6 \|", err)) == 1


_MESH_CHILD = """
import json, os
from dpo_jax import distributed, sharding
distributed.initialize(distributed.plan_initialization(os.environ))
import jax

out = {"count": jax.process_count(), "local": [d.id for d in jax.local_devices()]}
for name, shape in (("data2_fsdp4", (2, 4, 1)), ("data2_fsdp2_tensor2", (2, 2, 2)),
                    ("fsdp8", (1, 8, 1))):
    mesh = sharding.make_mesh(shape)
    out[name] = {"spans": distributed.axis_process_spans(mesh),
                 "owners": [d.process_index for d in mesh.devices.flat]}
print("RESULT " + json.dumps(out))
"""


def test_mesh_puts_data_across_hosts_and_fsdp_tensor_inside(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    try:
        for pid in range(2):
            env = dict(_env(), JAX_PLATFORMS="cpu", DPO_JAX_COORDINATOR=f"127.0.0.1:{port}",
                       DPO_JAX_NUM_PROCESSES="2", DPO_JAX_PROCESS_ID=str(pid),
                       XLA_FLAGS="--xla_force_host_platform_device_count=4 "
                                 "--xla_cpu_enable_concurrency_optimized_scheduler=false")
            procs.append(subprocess.Popen([sys.executable, "-c", _MESH_CHILD], cwd=REPO, env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.split("RESULT ", 1)[1]))
    assert results[0]["count"] == 2 and set(results[0]["local"]).isdisjoint(results[1]["local"])
    for r in results:
        assert r["data2_fsdp4"]["spans"] == {"data": 2, "fsdp": 1, "tensor": 1}
        assert r["data2_fsdp4"]["owners"] == [0] * 4 + [1] * 4  # data row i on process i
        assert r["data2_fsdp2_tensor2"]["spans"] == {"data": 2, "fsdp": 1, "tensor": 1}
        assert r["fsdp8"]["spans"] == {"data": 1, "fsdp": 2, "tensor": 1}  # asked for: spans hosts


def _wait_for(predicate, what, timeout=TIMEOUT):
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > timeout:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_sigterm_to_one_process_checkpoints_all_and_the_rerun_resumes_exactly(tmp_path,
                                                                               two_process_run):
    _, want = two_process_run
    workdir = str(tmp_path / "cut")
    proc = _start(workdir, 2, 4)
    try:
        pids = {}

        def started():
            assert proc.poll() is None, open(f"{workdir}.err").read()[-4000:]  # died early
            pids.update(re.findall(r"process (\d) pid (\d+)", open(f"{workdir}.out").read()))
            # Both guards installed (logged by each process before its first step).
            return len(pids) == 2 and open(f"{workdir}.err").read().count("preemption guard") == 2

        _wait_for(started, "processes did not start training")
        os.kill(int(pids["1"]), signal.SIGTERM)  # only process 1 is told
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    _finish(proc, workdir)  # both processes exit 0
    summary = json.load(open(os.path.join(workdir, "summary.json")))  # written by process 0
    stopped = summary["stopped_at"]
    assert stopped is not None and 1 <= stopped < STEPS, summary
    assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(stopped)]
    cut = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert cut[-1]["step"] == stopped

    _finish(_start(workdir, 2, 4), workdir)
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["resumed_from"] == stopped and summary["stopped_at"] is None
    got = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [_same_keys(r) for r in got] == [_same_keys(r) for r in want]  # exact
