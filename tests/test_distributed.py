"""Multi-host plumbing without a cluster: the init decision per environment, the SLURM
coordinator (checked against JAX's own SlurmCluster), mesh host spans, the SIGTERM guard,
and launch.sh's printed commands (with stand-ins for gcloud/sbatch)."""

import os
import signal
import stat
import subprocess
import sys
import types

import numpy as np
import pytest

from dpo_jax import distributed as D

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch.sh")


def test_single_process_needs_no_initialisation():
    assert D.plan_initialization({}) is None
    assert D.plan_initialization({"SLURM_NTASKS": "1", "SLURM_PROCID": "0",
                                  "SLURM_JOB_NODELIST": "n1"}) is None
    assert D.plan_initialization({"TPU_WORKER_HOSTNAMES": "t1"}) is None  # one-host TPU VM
    assert D.plan_initialization({}, "h:1", 1, 0) is None


def test_explicit_flags_beat_env_and_partial_settings_are_refused():
    env = {D.ENV_COORDINATOR: "10.0.0.1:1234", D.ENV_NUM_PROCESSES: "4", D.ENV_PROCESS_ID: "3"}
    assert D.plan_initialization(env) == D.InitPlan("explicit", "10.0.0.1:1234", 4, 3)
    assert D.plan_initialization(env, process_id=1).process_id == 1
    # Explicit settings win over SLURM's.
    slurm = {"SLURM_NTASKS": "8", "SLURM_PROCID": "5", "SLURM_JOB_NODELIST": "n1", **env}
    assert D.plan_initialization(slurm).source == "explicit"
    with pytest.raises(ValueError, match="process id"):
        D.plan_initialization({D.ENV_COORDINATOR: "h:1", D.ENV_NUM_PROCESSES: "2"})
    with pytest.raises(ValueError, match=r"not in \[0, 2\)"):
        D.plan_initialization({}, "h:1", 2, 2)


@pytest.mark.parametrize("nodes", ["node001", "node001,host2", "node[001-0015],host2",
                                   "node[001,007-015],host2"])
def test_slurm_coordinator_matches_jax_slurm_cluster(monkeypatch, nodes):
    from jax._src.clusters.slurm_cluster import SlurmCluster

    env = {"SLURM_JOB_ID": "987654", "SLURM_STEP_NODELIST": nodes, "SLURM_NTASKS": "4",
           "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    plan = D.plan_initialization(env)
    assert plan == D.InitPlan("slurm", SlurmCluster.get_coordinator_address(None, None), 4, 2)
    assert D.plan_initialization({**env, D.ENV_PORT: "5555"}).coordinator_address.endswith(":5555")


def test_slurm_single_node_bracket_list():
    # JAX's parser returns 'gpu-a17]' for this one (it stops only at ',' or '-').
    assert D.slurm_first_host("gpu-a[17]") == "gpu-a17"
    assert D.slurm_first_host("a[08-09],b[1]") == "a08"


def test_tpu_pod_is_left_to_jax_metadata():
    assert D.plan_initialization({"TPU_WORKER_HOSTNAMES": "t1,t2,t3,t4"}) == D.InitPlan("tpu")
    assert D.plan_initialization({D.ENV_TPU_POD: "1"}).kwargs() == {}


def test_axis_process_spans_counts_hosts_along_each_axis():
    dev = lambda p: types.SimpleNamespace(process_index=p)  # noqa: E731
    # 2 hosts x 4 devices, data across hosts: fsdp/tensor stay inside a host.
    devices = np.array([[[dev(0)], [dev(0)], [dev(0)], [dev(0)]],
                        [[dev(1)], [dev(1)], [dev(1)], [dev(1)]]])
    mesh = types.SimpleNamespace(devices=devices, axis_names=("data", "fsdp", "tensor"))
    assert D.axis_process_spans(mesh) == {"data": 2, "fsdp": 1, "tensor": 1}
    mesh.devices = devices.reshape(1, 8, 1)
    assert D.axis_process_spans(mesh) == {"data": 1, "fsdp": 2, "tensor": 1}


def test_sigterm_sets_the_stop_flag_and_close_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    guard = D.PreemptionGuard(mesh=None)
    assert not guard.should_stop()
    os.kill(os.getpid(), signal.SIGTERM)
    assert guard.should_stop()
    guard.close()
    assert signal.getsignal(signal.SIGTERM) is before


def _fake_bin(tmp_path, name):
    path = tmp_path / "bin" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(f'#!/bin/sh\necho "{name} called: $*" >> "{tmp_path}/calls"\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return dict(os.environ, PATH=f"{path.parent}:{os.environ['PATH']}")


def test_launch_help_explains_every_mode():
    out = subprocess.run(["bash", LAUNCH, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for mode in ("launch.sh tpu NAME ZONE", "launch.sh slurm NODES GPUS_PER_NODE",
                 "launch.sh local N", "--dry-run", "--install git|tarball"):
        assert mode in out.stdout


def test_launch_slurm_dry_run_writes_the_script_and_submits_nothing(tmp_path):
    env = _fake_bin(tmp_path, "sbatch")
    script = tmp_path / "job.sbatch"
    out = subprocess.run(
        ["bash", LAUNCH, "slurm", "4", "8", "--dry-run", "--script", str(script), "--time",
         "04:00:00", "--", "--config=configs/default.py", "--config.loss.name=ipo",
         "--workdir=/shared/run 1"],
        capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 0, out.stderr
    text = script.read_text()
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --requeue", "#SBATCH --signal=TERM@120", "#SBATCH --time=04:00:00",
                 r"srun --kill-on-bad-exit=1 python -m dpo_jax.main --config=configs/default.py "
                 r"--config.loss.name=ipo --workdir=/shared/run\ 1"):
        assert line in text
    assert f"+ sbatch {script}" in out.stderr
    assert not (tmp_path / "calls").exists()  # dry run: sbatch never ran
    out = subprocess.run(["bash", LAUNCH, "slurm", "2", "4", "--script", str(script), "--", "-x"],
                         capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "calls").read_text() == f"sbatch called: {script}\n"


def test_launch_tpu_prints_and_runs_the_gcloud_commands(tmp_path):
    env = _fake_bin(tmp_path, "gcloud")
    out = subprocess.run(
        ["bash", LAUNCH, "tpu", "pod1", "us-central2-b", "--project", "p", "--git-url",
         "https://example.org/dpo_jax.git", "--", "--workdir=/mnt/runs/a b"],
        capture_output=True, text=True, timeout=30, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 2
    ssh = "gcloud called: compute tpus tpu-vm ssh pod1 --zone us-central2-b --worker=all --project p"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    assert calls[0] == (ssh + " --command rm -rf ~/dpo_jax && git clone -q "
                        "https://example.org/dpo_jax.git ~/dpo_jax && git -C ~/dpo_jax checkout -q "
                        f"{commit} && pip install -U 'jax[tpu]' && pip install -e ~/dpo_jax")
    assert calls[1] == ssh + (r" --command cd ~/dpo_jax && DPO_JAX_TPU_POD=1 python3 -m "
                              r"dpo_jax.main --workdir=/mnt/runs/a\ b")
    printed = [line for line in out.stderr.splitlines() if line.startswith("+ gcloud")]
    assert len(printed) == 2  # each command shown before it runs


@pytest.mark.slow  # the suite's 8-minute budget: a sibling test covers the kind
def test_launch_local_fails_when_a_process_fails(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    out = subprocess.run(["bash", LAUNCH, "local", "2", "--", "--no_such_flag=1"],
                         capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    assert out.returncode != 0
    assert "process 0 pid" in out.stdout and "process 1 pid" in out.stdout
    assert "DPO_JAX_PROCESS_ID=1" in out.stderr  # the exact commands are printed


def test_state_bytes_per_device_equal_the_real_shards():
    """Against the state every task places on 8 devices (``dpo_jax.state``: parameters from
    their source, then ``create_state``); vocab 130 is not divisible by 4 or 8, so some
    dimensions stay replicated. Optimizer moments must carry their parameters' shardings:
    held whole on every device, FSDP's moments would exceed the computed bytes."""
    mesh_shape, optimizer = {"data": 2, "fsdp": 2, "tensor": 2}, "adamw"
    import jax

    from dpo_jax import sharding
    from dpo_jax import state as state_lib
    from dpo_jax.config import ParamSources
    from dpo_jax.models import Model, preset
    from dpo_jax.optim import OptimConfig, make_optimizer

    cfg = preset("tiny-gpt2", vocab_size=130, d_model=32, d_ff=64)
    model = Model(cfg)
    mesh = sharding.make_mesh(mesh_shape)
    shardings = state_lib.param_shardings(model, mesh, sharding.DEFAULT_RULES)
    tx, _ = make_optimizer(OptimConfig(name=optimizer, warmup_steps=0, max_grad_norm=1.0), 10)
    state = state_lib.create_state(state_lib.init_policy(model, shardings, ParamSources()), tx,
                                   mesh, shardings)
    params, opt_state = state.trainable, state.opt_state

    def on_device(tree, device):
        return sum(s.data.nbytes for x in jax.tree.leaves(tree) if x.ndim  # counters: scalars
                   for s in x.addressable_shards if s.device == device)

    want = D.state_bytes_per_device(cfg, mesh_shape, ref_dtype="bfloat16", optimizer=optimizer)
    for device in mesh.devices.flat:
        assert on_device(params, device) == want["params"] == want["grads"]
        assert on_device(opt_state, device) == want["optimizer"]
    assert want["reference"] * 2 == want["params"]
    assert want["total"] == sum(v for k, v in want.items() if k != "total")


def test_docs_memory_table_is_the_computed_one():
    docs = open(os.path.join(REPO, "docs", "scale.md")).read()
    assert D.scale_table() in docs  # regenerate with `python -m dpo_jax.distributed`
    from dpo_jax.models import preset

    replicated = {n: D.state_bytes_per_device(preset(n), {"data": 8}, ref_dtype="bfloat16",
                                              optimizer="rmsprop")["total"] / 1e9
                  for n in ("pythia-2.8b", "gpt-j-6b")}
    assert f"pythia-2.8b\nwould need {replicated['pythia-2.8b']:.2f} GB" in docs
    assert f"gpt-j-6b {replicated['gpt-j-6b']:.2f} GB" in docs
