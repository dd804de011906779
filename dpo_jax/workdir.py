"""One run per workdir, started and resumed with one config.

``open_run(config, workdir)`` is the first thing every task does, before it builds anything:

* **Lock.** Process 0 takes an exclusive ``flock`` on ``WORKDIR/.lock`` and writes its holder
  (host, pid, job id, start time) into it. A second process on the same workdir is refused at
  once with a message naming the holder. The kernel drops the lock when its process dies, so a
  killed run never blocks its rerun (``flock`` also works across hosts on NFSv4). The lock is
  re-entrant within the thread that holds it: a task that calls another task on its own
  workdir opens it again (the config is checked again) and the lock is released when the
  outermost ``open_run`` ends; another thread of the same process is refused.
* **Config.** A workdir remembers the config it was started with (``config.json``). A rerun
  whose config differs in anything that changes the result is refused, listing the differing
  fields. Fields in ``SAFE_ON_RESUME`` may differ when the rerun names them in
  ``config.allow_resume_changes`` (comma list); each accepted change is appended to
  ``config_history.jsonl``. Nothing is written to the workdir before the config is accepted.
* **Finished runs.** A workdir whose ``summary.json`` says ``finished`` (and whose config is
  unchanged) is reported as it is: the task returns that summary without training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import functools
import inspect
import json
import os
import socket
import threading
from typing import Any, Callable, Iterator

import jax
import ml_collections
from absl import logging

from dpo_jax import sharding as shard_lib
from dpo_jax.batch_sizes import check_batch_sizes
from dpo_jax.config import read_config, resolve_defaults
from dpo_jax.distributed import axis_process_spans
from dpo_jax.models.hf_dir import check_hf_dir
from dpo_jax.config import base_config

CONFIG = "config.json"
HISTORY = "config_history.jsonl"
SUMMARY = "summary.json"
LOCK = ".lock"

# Fields that change no number of the trained model: how long to run (unless the learning-rate
# schedule decays over the run length), how often to log / evaluate / checkpoint, eval batching.
SAFE_ON_RESUME = (
    "train.steps", "train.log_every", "train.eval_every", "train.eval_batch_size",
    "train.checkpoint_every", "train.keep_checkpoints", "train.async_checkpointing",
    "train.diagnostics",  # metrics only: the loss and update are the same bits (test_diagnostics)
)
# Never compared: the override list itself and where metrics are mirrored.
NOT_COMPARED = ("allow_resume_changes", "log.wandb_project", "log.wandb_entity", "log.wandb_name")


class WorkdirError(RuntimeError):
    """The workdir cannot take this run (in use, or started with another config)."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON values (what ``config.json`` holds)."""
    return json.loads(config.to_json_best_effort(sort_keys=True))


def effective_rules(rules: list, shape: dict) -> list:
    """``mesh.rules`` as they act on a mesh of ``shape`` (a config's ``mesh.shape``; a missing
    axis is 1): mesh axes of size 1 dropped, a one-axis list read as that axis. So the rule
    ``[embed, [fsdp, context]]`` (the default since the context axis) equals the earlier
    ``[embed, fsdp]`` on a mesh without context parallelism: same shardings, same run."""
    out = []
    for name, axis in rules:
        axes = [] if axis is None else [axis] if isinstance(axis, str) else list(axis)
        axes = [a for a in axes if shape.get(a, 1) != 1]
        out.append([name, None if not axes else axes[0] if len(axes) == 1 else axes])
    return out


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
    """``{field: (old, new)}`` for every leaf that differs (lists compared as lists). A field
    the old config lacks (added to the schema since) counts only when it is not at its default.
    ``mesh.rules`` are compared as they act on each config's mesh (:func:`effective_rules`)."""
    old, new = (_with_effective_rules(c) for c in (old, new))
    a, b = _flat(old), _flat(new)
    defaults = _flat(config_dict(base_config()))
    out = {}
    for k in sorted(set(a) | set(b)):
        if k in NOT_COMPARED or (k not in a and k in defaults and b.get(k) == defaults[k]):
            continue
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if va != vb:
            out[k] = (va, vb)
    return out


def _with_effective_rules(config: dict) -> dict:
    mesh = config.get("mesh")
    if not isinstance(mesh, dict) or "rules" not in mesh:
        return config
    mesh = dict(mesh, rules=effective_rules(mesh["rules"], mesh.get("shape") or {}))
    return dict(config, mesh=mesh)


def refused_changes(changes: dict[str, tuple[Any, Any]], allowed: str,
                    new: dict) -> list[str]:
    """Lines naming each change that a resume may not make (empty: all accepted)."""
    allowed_set = {s.strip() for s in (allowed or "").split(",") if s.strip()}
    schedule = _flat(new).get("optim.schedule", "constant")
    lines = []
    for field, (old, value) in changes.items():
        why = None
        if field not in SAFE_ON_RESUME:
            why = "changes the result"
        elif field == "train.steps" and schedule != "constant":
            why = f"the {schedule} learning-rate schedule decays over train.steps"
        elif field not in allowed_set:
            why = "safe, but not named in --config.allow_resume_changes"
        if why:
            lines.append(f"  {field}: {old!r} -> {value!r} ({why})")
    return lines


@dataclasses.dataclass
class RunDir:
    """An accepted workdir. ``finished`` runs carry their ``summary``."""

    path: str
    finished: bool = False
    summary: dict | None = None

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)


def _holder() -> dict[str, Any]:
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("DPO_JAX_JOB_ID") or ""
    return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": job,
            "since": datetime.datetime.now().isoformat(timespec="seconds")}


def _lock(path: str):
    """The open, flock-ed lock file of ``path``; WorkdirError naming the holder if taken."""
    f = open(os.path.join(path, LOCK), "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "{}"
        f.close()
        try:
            h = json.loads(holder)
            who = f"pid {h.get('pid')} on host {h.get('host')}" + (
                f" (job {h['job_id']})" if h.get("job_id") else "") + f", since {h.get('since')}"
        except json.JSONDecodeError:
            who = "another process"
        raise WorkdirError(f"workdir {path!r} is in use by {who}: wait for that run to end, or "
                           "give this run another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps(_holder()))
    f.flush()
    return f


@dataclasses.dataclass
class _Hold:
    """A workdir this process has locked: the flock-ed file, how many ``open_run`` are open on
    it, and the thread that opened the first."""

    file: Any
    depth: int
    thread: int


_HELD: dict[str, _Hold] = {}  # absolute workdir path -> its hold, on process 0
_HELD_GUARD = threading.Lock()


def _enter(path: str) -> None:
    """Lock ``path`` for this thread, or re-enter this thread's lock; WorkdirError when another
    process or another thread of this process holds it."""
    with _HELD_GUARD:
        hold = _HELD.get(path)
        if hold is None:
            _HELD[path] = _Hold(_lock(path), 1, threading.get_ident())
        elif hold.thread == threading.get_ident():
            hold.depth += 1
        else:
            raise WorkdirError(f"workdir {path!r} is in use by another thread of this process "
                               f"(pid {os.getpid()}): give this run another --workdir")


def _exit(path: str) -> None:
    """Undo one :func:`_enter`; the outermost releases the lock."""
    with _HELD_GUARD:
        hold = _HELD[path]
        hold.depth -= 1
        if hold.depth == 0:
            del _HELD[path]
            hold.file.close()


def _atomic_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def _accept(path: str, config: ml_collections.ConfigDict) -> RunDir:
    """Compare with the workdir's config; write config.json / history only once accepted."""
    new = config_dict(config)
    config_path = os.path.join(path, CONFIG)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    if os.path.exists(config_path):
        with open(config_path) as f:
            old = json.load(f)
        changes = config_changes(old, new)
        has_state = os.path.isdir(os.path.join(path, "checkpoints")) and any(
            name.isdigit() for name in os.listdir(os.path.join(path, "checkpoints")))
        refused = refused_changes(changes, config.get("allow_resume_changes", ""), new)
        if refused and has_state:
            raise WorkdirError(
                f"workdir {path!r} holds a run started with another config; this rerun changes:\n"
                + "\n".join(refused)
                + "\nTo proceed: rerun with the workdir's config (its config.json), give this "
                "config a new --workdir, or, for the fields marked safe, name them in "
                "--config.allow_resume_changes=FIELD[,FIELD] (recorded in config_history.jsonl).")
        if changes:
            event = "resume with changes" if has_state else "restart (no checkpoint to resume)"
            _append_history(path, {"time": stamp, "event": event,
                                   "changes": {k: list(v) for k, v in changes.items()}})
            _atomic_json(config_path, new)
        summary_path = os.path.join(path, SUMMARY)
        if not changes and os.path.exists(summary_path):
            with open(summary_path) as f:
                summary = json.load(f)
            if summary.get("finished"):
                return RunDir(path, finished=True, summary=summary)
        return RunDir(path)
    _atomic_json(config_path, new)
    _append_history(path, {"time": stamp, "event": "start"})
    return RunDir(path)


def _append_history(path: str, record: dict) -> None:
    with open(os.path.join(path, HISTORY), "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def _agree(ok: bool, message: str) -> None:
    """Every process raises when process 0 refused (multi-host: process 0 decides)."""
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        ok = bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
    if not ok:
        raise WorkdirError(message or "process 0 refused the workdir (see its log)")


@contextlib.contextmanager
def open_run(config: ml_collections.ConfigDict, workdir: str) -> Iterator[RunDir]:
    """Lock ``workdir`` and accept ``config`` for it (see the module docstring); yields a
    :class:`RunDir`, releases the lock on exit (re-entrant within the holding thread: the
    outermost exit releases it). Raises WorkdirError."""
    path = os.path.abspath(workdir)
    locked, run, message = False, None, ""
    if jax.process_index() == 0:
        os.makedirs(path, exist_ok=True)
        try:
            _enter(path)
            locked = True
            run = _accept(path, config)
        except WorkdirError as e:
            message = str(e)
            if locked:
                _exit(path)
                locked = False
    _agree(not message, message)
    if run is None:  # processes > 0 follow process 0's decision
        summary_path = os.path.join(path, SUMMARY)
        summary = None
        if os.path.exists(summary_path):
            with open(summary_path) as f:
                summary = json.load(f)
        finished = bool(summary and summary.get("finished")
                        and summary.get("steps") == int(config.train.steps))
        run = RunDir(path, finished=finished, summary=summary if finished else None)
    try:
        yield run
    finally:
        if locked:
            _exit(path)


class RunStopped(RuntimeError):
    """A run that a chain of runs depends on stopped before its last step (preempted)."""


def finished_summary(workdir: str) -> dict:
    """``workdir``'s ``summary.json`` when it says ``finished``, for code that chains runs (a
    pipeline stage, an experiment script) and must not read a preempted run as a done one.

    Raises FileNotFoundError when there is no summary, and :class:`RunStopped` (naming the
    workdir and the step it stopped at) when the run stopped before ``train.steps``: rerunning
    the same command resumes it from that checkpoint."""
    path = os.path.join(workdir, SUMMARY)
    with open(path) as f:
        summary = json.load(f)
    if not summary.get("finished", True):
        raise RunStopped(
            f"{workdir}: the run stopped at step {summary.get('stopped_at')} of "
            f"{summary.get('steps')} (SIGTERM / preemption; its {SUMMARY} says finished=false), "
            "so nothing that depends on it runs; rerun the same command to resume it")
    return summary


def write_summary(run: RunDir, summary: dict) -> None:
    """``summary.json``, atomically, from process 0."""
    if jax.process_index() == 0:
        _atomic_json(run.file(SUMMARY), summary)


def check_model_dirs(config: ml_collections.ConfigDict) -> None:
    """`models.hf_dir.check_hf_dir` on the run config's `model.hf_path` and `model.ref_hf_path`
    (with `data.tokenizer` when set): config.json, safetensors and tokenizer checked before
    anything is written. Errors name the config field, the file and the field or tensor."""
    model = config.get("model")
    if model is None:
        return
    data = config.get("data")
    tokenizer = (data.get("tokenizer") if data is not None else "") or ""
    for field in ("hf_path", "ref_hf_path"):
        path = model.get(field) or ""
        if path:
            check_hf_dir(path, field=f"model.{field}", tokenizer=tokenizer)


def check_run(config: ml_collections.ConfigDict) -> None:
    """Every check a task needs before it writes to the workdir: the model directories
    (:func:`check_model_dirs`), the config read whole (``config.read_config``: ValueError naming
    a bad or missing field) and every batch dimension against the mesh
    (``batch_sizes.check_batch_sizes``), the expert axis against the experts, and a context
    axis inside each host (:func:`check_context_axis`)."""
    check_model_dirs(config)
    rc = read_config(config)
    check_batch_sizes(config)
    if rc.mesh_shape.get(shard_lib.CONTEXT_AXIS, 1) != 1:
        check_context_axis(shard_lib.make_mesh(rc.mesh_shape))
    axis, experts = rc.model.moe_expert_axis, rc.model.n_experts
    if axis and experts:
        size = shard_lib.make_mesh(rc.mesh_shape).shape[axis]
        if experts % size:
            raise ValueError(f"model.moe_expert_axis={axis!r} splits the {experts} experts over "
                             f"the mesh's {axis} axis of {size} devices, which does not divide "
                             f"them: change mesh.shape.{axis} or model.moe_expert_axis")


def check_context_axis(mesh) -> None:
    """ValueError when the mesh's ``context`` axis spans several processes: each process loads
    whole rows of its block of the batch (``data.to_global``), so the devices that split a
    row's length must sit in one host (``jax.make_mesh`` keeps the trailing axes inside a host
    when ``context x tensor`` divides the devices per host)."""
    span = axis_process_spans(mesh)[shard_lib.CONTEXT_AXIS]
    if span > 1:
        raise ValueError(f"mesh.shape.context={mesh.shape[shard_lib.CONTEXT_AXIS]} spans {span} "
                         f"processes, but each process loads whole rows: make context x tensor "
                         f"at most the {len(mesh.local_devices)} devices of a host (and a "
                         f"divisor of it), and raise fsdp or data instead")


def _run_mesh(config: ml_collections.ConfigDict):
    """``jax.set_mesh`` of the run's mesh: expert and context parallelism read the mesh their
    program is traced under (models/moe_parallel.py, models/context_parallel.py), and the
    decoder constrains its activations to the batch's layout under it (rows over data x
    fsdp: ``context_parallel.constrain_sequence``)."""
    return jax.set_mesh(shard_lib.make_mesh(dict(config.mesh.shape)))


def opens_workdir(fn: Callable[..., dict]) -> Callable[..., dict]:
    """The task function ``(config, workdir: str, **kwargs) -> summary`` whose body is ``fn(config,
    run: RunDir, **kwargs) -> summary``: the returned function's signature says ``workdir``
    (``inspect.signature``), and ``.in_run`` is ``fn`` itself.

    Defaults chosen on the user's behalf (``dpo_jax.config.resolve_defaults``: the optimizer of
    a run that imports a checkpoint) are filled in first, so ``config.json`` holds what the run
    uses; each is logged as a warning and listed in the summary as ``config_notes``. Before
    anything is written, the run is checked (:func:`check_run`: model directories, the whole
    config, batch sizes against the mesh; each error names the file or field and the fix); then
    the workdir is opened and accepted (:func:`open_run`, re-entrant: a task may call another
    task on its own workdir), and a finished run's summary is returned without calling ``fn``."""

    @functools.wraps(fn)
    def run_task(config: ml_collections.ConfigDict, workdir: str, **kwargs) -> dict:
        config, notes = resolve_defaults(config)
        for note in notes:
            logging.warning("%s", note)
        check_run(config)
        with open_run(config, workdir) as run, _run_mesh(config):
            if run.finished:
                return run.summary
            summary = fn(config, run, **kwargs)
            if notes and isinstance(summary, dict):
                summary = {**summary, "config_notes": notes}
                write_summary(run, summary)
            return summary

    body = inspect.signature(fn)
    params = list(body.parameters.values())
    if len(params) < 2:
        raise TypeError(f"{fn.__qualname__}: a task body takes (config, run, **kwargs)")
    params[1] = inspect.Parameter("workdir", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                  annotation="str")
    run_task.__signature__ = body.replace(parameters=params)
    run_task.in_run = fn
    return run_task
