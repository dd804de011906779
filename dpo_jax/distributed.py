"""Multi-host runs: when and how to call ``jax.distributed.initialize``, where the mesh's axes
sit relative to hosts, and a SIGTERM guard that stops every process at the same step.

The decision is a pure function of flags and environment (``plan_initialization``), so each
cluster kind (TPU pod, SLURM, explicit) is testable without the cluster. Precedence:

1. explicit: ``--coordinator_address/--num_processes/--process_id`` flags, else the
   ``DPO_JAX_COORDINATOR`` / ``DPO_JAX_NUM_PROCESSES`` / ``DPO_JAX_PROCESS_ID`` env vars;
2. SLURM: ``SLURM_NTASKS > 1`` (one task per node; the coordinator is the first node of the
   step's node list, its port ``DPO_JAX_COORDINATOR_PORT`` or derived from the job id as JAX does);
3. TPU pod: a multi-worker TPU VM (``TPU_WORKER_HOSTNAMES`` with several hosts, or
   ``DPO_JAX_TPU_POD=1`` which ``launch.sh tpu`` sets): ``jax.distributed.initialize()`` with no
   arguments, which reads the topology from the TPU metadata;
4. otherwise a single process: no initialisation.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
from collections.abc import Mapping

import numpy as np
from absl import logging

ENV_COORDINATOR = "DPO_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "DPO_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "DPO_JAX_PROCESS_ID"
ENV_PORT = "DPO_JAX_COORDINATOR_PORT"
ENV_TPU_POD = "DPO_JAX_TPU_POD"


# On CPU, the concurrency-optimised scheduler can run independent collectives in different
# orders on different (virtual) devices and deadlock the rendezvous.
CPU_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def xla_flags(flags_value: str) -> str:
    """``XLA_FLAGS`` with :data:`CPU_SCHEDULER_FLAG` appended unless it sets that option
    already (either way)."""
    if "xla_cpu_enable_concurrency_optimized_scheduler" in flags_value:
        return flags_value
    return f"{flags_value} {CPU_SCHEDULER_FLAG}".strip()


# XLA:CPU runs a program's thunks concurrently, and a collective blocks the thread that runs
# it until every device of its group has arrived (an in-process rendezvous). Collectives start
# in program order, but a later one may start before an earlier one ends: they are chained by
# "scheduling" edges only (xla/runtime/execution_graph.cc), so e.g. a collective-permute after
# a layer loop starts once the loop's body goes asynchronous, while the body's all-gathers
# still block. All the fake devices of a process share one intra-op pool of max(cores,
# devices) threads (xla/pjrt/cpu/cpu_client.cc): with about two blocked collectives per
# device the pool is used up before the last devices reach their rendezvous, and the program
# hangs with no CPU use. Seen on a 2-core host: a 32k-token context-parallel DPO step on 8
# fake devices: 13 threads blocked in an all-gather and a collective-permute (all 8 pool
# threads and 5 of the 8 dispatch threads; the other 3 waited for their devices' programs),
# the rest of the program queued behind them (experiments/bench/README.md). XLA sizes its
# CPU pools (intra-op and dispatch) from the PJRT_NPROC variable (xla/pjrt/utils.cc,
# DefaultThreadPoolSize), so runs on fake devices get CPU_THREADS_PER_DEVICE threads per
# device; blocked threads cost no CPU.
CPU_THREADS_PER_DEVICE = 4
_DEVICE_COUNT = re.compile(r"--xla_force_host_platform_device_count=(\d+)")


def host_device_count(flags_value: str) -> int:
    """The ``--xla_force_host_platform_device_count`` in an ``XLA_FLAGS`` value (the last one
    wins, as in XLA), else 1."""
    found = _DEVICE_COUNT.findall(flags_value)
    return int(found[-1]) if found else 1


def cpu_pool_threads(environ: Mapping[str, str], cores: int | None = None) -> int | None:
    """The ``PJRT_NPROC`` to set for ``environ``: max(cores, :data:`CPU_THREADS_PER_DEVICE` x
    the fake CPU devices of its ``XLA_FLAGS``) when there are several and neither
    ``PJRT_NPROC`` nor ``NPROC`` is set (XLA reads both; a user's value is kept), else None.
    ``cores``: ``os.cpu_count()`` unless given."""
    devices = host_device_count(environ.get("XLA_FLAGS", ""))
    if devices <= 1 or "PJRT_NPROC" in environ or "NPROC" in environ:
        return None
    return max(cores or os.cpu_count() or 1, CPU_THREADS_PER_DEVICE * devices)


def set_xla_flags(environ=os.environ) -> None:
    """Set ``environ['XLA_FLAGS']`` to :func:`xla_flags` of it and ``PJRT_NPROC`` to
    :func:`cpu_pool_threads` where that is not None. XLA reads both when jax initialises its
    backends (the first ``jax.devices()``, not ``import jax``), so ``dpo_jax.main.main`` calls
    this before anything touches a device; importing a module changes nothing."""
    environ["XLA_FLAGS"] = xla_flags(environ.get("XLA_FLAGS", ""))
    threads = cpu_pool_threads(environ)
    if threads is not None:
        environ["PJRT_NPROC"] = str(threads)


@dataclasses.dataclass(frozen=True)
class InitPlan:
    """Arguments for ``jax.distributed.initialize``; ``None`` fields are left to JAX (TPU)."""

    source: str  # 'explicit', 'slurm' or 'tpu'
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def kwargs(self) -> dict:
        return {k: v for k, v in (("coordinator_address", self.coordinator_address),
                                  ("num_processes", self.num_processes),
                                  ("process_id", self.process_id)) if v is not None}


def slurm_first_host(node_list: str) -> str:
    """First host of a SLURM node list: 'n1,n2' -> 'n1', 'gpu[003-007,9],x' -> 'gpu003'."""
    node_list = node_list.strip()
    cut = next((i for i, ch in enumerate(node_list) if ch in ",["), len(node_list))
    if cut == len(node_list) or node_list[cut] == ",":
        return node_list[:cut]
    first = re.split(r"[,\-\]]", node_list[cut + 1:], maxsplit=1)[0]
    return node_list[:cut] + first


def slurm_port(job_id: str) -> int:
    """JAX's own choice (``SlurmCluster``): a port in [61440, 65535] from the job id, so every
    task of a job picks the same one without talking."""
    return int(job_id) % 2**12 + (65535 - 2**12 + 1)


def plan_initialization(env: Mapping[str, str], coordinator_address: str | None = None,
                        num_processes: int | None = None,
                        process_id: int | None = None) -> InitPlan | None:
    """Which multi-host initialisation this process needs (None: a single-process run)."""
    address = coordinator_address or env.get(ENV_COORDINATOR) or None
    count = num_processes if num_processes is not None else _int(env.get(ENV_NUM_PROCESSES))
    pid = process_id if process_id is not None else _int(env.get(ENV_PROCESS_ID))
    if address or count is not None or pid is not None:
        missing = [n for n, v in (("coordinator address", address), ("number of processes", count),
                                  ("process id", pid)) if v is None]
        if missing:
            raise ValueError(f"explicit multi-process run needs {', '.join(missing)} "
                             f"(flags --coordinator_address/--num_processes/--process_id or "
                             f"{ENV_COORDINATOR}/{ENV_NUM_PROCESSES}/{ENV_PROCESS_ID})")
        if not 0 <= pid < count:
            raise ValueError(f"process id {pid} is not in [0, {count})")
        if count == 1:
            return None
        return InitPlan("explicit", address, count, pid)
    ntasks = _int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS"))
    if ntasks is not None and ntasks > 1 and "SLURM_PROCID" in env:
        nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodes:
            raise ValueError("SLURM_NTASKS > 1 but no SLURM_STEP_NODELIST/SLURM_JOB_NODELIST")
        port = _int(env.get(ENV_PORT)) or slurm_port(env.get("SLURM_JOB_ID", "0"))
        return InitPlan("slurm", f"{slurm_first_host(nodes)}:{port}", ntasks,
                        int(env["SLURM_PROCID"]))
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if env.get(ENV_TPU_POD) == "1" or len(hosts) > 1:
        return InitPlan("tpu")
    return None


def initialize(plan: InitPlan | None) -> None:
    """Call ``jax.distributed.initialize`` for ``plan`` (before anything touches a device).

    On CPU (``JAX_PLATFORMS=cpu``, the local test launcher) cross-process collectives need gloo,
    which must be chosen before the CPU backend exists.
    """
    if plan is None:
        return
    import jax

    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logging.info("jax.distributed.initialize (%s): %s", plan.source, plan.kwargs() or "from TPU metadata")
    jax.distributed.initialize(**plan.kwargs())


def axis_process_spans(mesh) -> dict[str, int]:
    """For each mesh axis, how many processes one line along that axis touches (the most over
    all lines). 1 means the axis' collectives stay inside a host; the intended layout for
    N hosts is ``data`` spanning hosts and ``fsdp``/``context``/``tensor`` at 1 when a host
    holds them."""
    owner = np.vectorize(lambda d: d.process_index)(mesh.devices)
    spans = {}
    for i, name in enumerate(mesh.axis_names):
        lines = np.moveaxis(owner, i, -1).reshape(-1, owner.shape[i])
        spans[name] = max(len(set(line.tolist())) for line in lines)
    return spans


_OPTIMIZER_MOMENTS = {"adamw": 2, "rmsprop": 1, "sgd": 0}  # param-shaped trees in opt_state


def state_bytes_per_device(model_cfg, mesh_shape: Mapping[str, int], *,
                           policy_dtype: str = "float32", ref_dtype: str | None = "float32",
                           optimizer: str = "adamw", rules=None) -> dict[str, int]:
    """Bytes one device holds for the training state under the config's sharding rules.

    Computed from the model's real parameter shapes and the same ``logical_to_spec`` the run
    uses (a dimension the mesh axis does not divide stays replicated), so it answers "does
    this model fit on this mesh" before renting the mesh. Policy, gradients and optimizer
    moments (optax keeps them in the parameter dtype) are in ``policy_dtype``; the frozen
    reference in ``ref_dtype`` (None: no reference). Activations are not included: they scale
    with batch per device, length and remat, not with the mesh.
    """
    import jax
    import jax.numpy as jnp

    from dpo_jax import sharding
    from dpo_jax.models import Model

    model = Model(dataclasses.replace(model_cfg, param_dtype=policy_dtype))
    dims = {a: int(mesh_shape.get(a, 1)) for a in sharding.MESH_AXES}
    mesh = type("ShapeOnlyMesh", (), {"shape": dims})()
    table = sharding.DEFAULT_RULES if rules is None else rules
    abstract, axes = model.abstract_params(), model.logical_axes()
    leaves = jax.tree.leaves(abstract)
    axes_leaves = jax.tree.leaves(axes, is_leaf=sharding._is_axes)
    elements = 0
    for a, ax in zip(leaves, axes_leaves):
        spec = sharding.logical_to_spec(ax, a.shape, mesh, table)
        split = sharding.spec_devices(spec, dims)
        elements += int(np.prod(a.shape)) // split
    pbytes = jnp.dtype(policy_dtype).itemsize
    out = {"params": elements * pbytes, "grads": elements * pbytes,
           "optimizer": _OPTIMIZER_MOMENTS[optimizer] * elements * pbytes,
           "reference": elements * jnp.dtype(ref_dtype).itemsize if ref_dtype else 0}
    out["total"] = sum(out.values())
    return out


class PreemptionGuard:
    """SIGTERM -> stop at a step boundary that every process agrees on.

    A signal only sets a flag. With several processes each one contributes its flag to a tiny
    max-reduction over the mesh, dispatched right after a train step and read one step later
    (when the loop already waits for that step), so the check never stalls the device queue and
    every process reads the same answer at the same step: if any process was signalled, all stop.
    """

    def __init__(self, mesh=None, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.requested = False
        self._mesh = mesh
        self._pending = None
        self._previous = {}
        self._reduce = None
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: nothing to install
                logging.warning("cannot install a handler for signal %d off the main thread", sig)
        logging.info("preemption guard: stopping at a step boundary on %s",
                     ", ".join(signal.Signals(s).name for s in self._previous))

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def should_stop(self) -> bool:
        """Call once per step, after dispatching it; True means save and stop after this step."""
        import jax

        if jax.process_count() == 1 or self._mesh is None:
            return self.requested
        agreed = bool(np.asarray(self._pending.addressable_data(0))) if self._pending is not None else False
        self._pending = self._any_process(self.requested)
        return agreed

    def _any_process(self, flag: bool):
        import jax
        import jax.numpy as jnp
        from jax.sharding import NamedSharding, PartitionSpec as P

        mesh = self._mesh
        flat = NamedSharding(mesh, P(tuple(mesh.axis_names)))
        # One element per device; this process fills its own devices, wherever they sit.
        mine = [jax.device_put(np.full((1,), int(flag), np.int32), d) for d in mesh.local_devices]
        flags = jax.make_array_from_single_device_arrays((mesh.size,), flat, mine)
        if self._reduce is None:
            self._reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, P()))
        return self._reduce(flags)

    def close(self) -> None:
        """Restore the handlers that were there before."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def _int(value: str | None) -> int | None:
    return None if value in (None, "") else int(value)


# (preset, optimizer, policy dtype, reference dtype, where, mesh) rows of docs/scale.md.
SCALE_EXAMPLES: tuple[tuple[str, str, str, str | None, str, dict], ...] = (
    ("gpt2-large", "rmsprop", "float32", "float32", "1 host, 8 GPUs", {"data": 8}),
    ("pythia-2.8b", "rmsprop", "float32", "bfloat16", "1 host, 8 GPUs", {"fsdp": 8}),
    ("pythia-2.8b", "rmsprop", "float32", "bfloat16", "TPU v4-32 (4 hosts x 4 chips)", {"data": 4, "fsdp": 4}),
    ("gpt-j-6b", "rmsprop", "float32", "bfloat16", "1 host, 8 GPUs", {"fsdp": 8}),
    ("gpt-j-6b", "rmsprop", "float32", "bfloat16", "TPU v5e-32 (8 hosts x 4 chips)", {"data": 2, "fsdp": 16}),
    ("llama-3.1-8b", "adamw", "float32", "bfloat16", "4 hosts x 8 GPUs", {"data": 4, "fsdp": 8}),
    ("llama-3.1-8b", "adamw", "float32", "bfloat16", "TPU v5p-64 (8 hosts x 4 chips)", {"data": 2, "fsdp": 16}),
    ("qwen2.5-7b", "adamw", "float32", "bfloat16", "2 hosts x 8 GPUs", {"data": 2, "fsdp": 8}),
    ("mistral-7b", "adamw", "bfloat16", "bfloat16", "1 host, 8 GPUs", {"fsdp": 8}),
)


def scale_table() -> str:
    """Markdown table of per-device state memory for ``SCALE_EXAMPLES`` (docs/scale.md)."""
    from dpo_jax.models import param_count, preset

    gb = lambda b: f"{b / 1e9:.2f}"  # noqa: E731
    lines = ["| model | params | optimizer | policy / ref dtype | where | mesh (data, fsdp, tensor) "
             "| params | grads | optimizer | reference | **total GB / device** |",
             "| --- | ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, opt, pdt, rdt, where, mesh in SCALE_EXAMPLES:
        cfg = preset(name)
        b = state_bytes_per_device(cfg, mesh, policy_dtype=pdt, ref_dtype=rdt, optimizer=opt)
        shape = tuple(int(mesh.get(a, 1)) for a in ("data", "fsdp", "tensor"))
        lines.append(f"| {name} | {param_count(cfg) / 1e9:.2f}B | {opt} | {pdt} / {rdt} | {where} "
                     f"| {shape} | {gb(b['params'])} | {gb(b['grads'])} | {gb(b['optimizer'])} "
                     f"| {gb(b['reference'])} | **{gb(b['total'])}** |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(scale_table())
