"""Batch sizes against the mesh, checked once at start-up, before a run writes anything.

Every array of a batch has its leading (example or row) axis sharded over the mesh axes
``sharding.BATCH_AXES`` = ('data', 'fsdp') of the *global* mesh, and each process holds a
contiguous block of it (``data.to_global``). So every global batch dimension must be a multiple
of ``lcm(data x fsdp, process count)``, the *data-parallel size*; JAX otherwise stops with an
``IndivisibleError`` that names no config field -- for an eval batch only at the first
evaluation. What the pipelines can pad they pad (packed and prefix-shared row counts are
rounded up to the data-parallel size with empty rows; the last eval batch is filled with
weight-0 copies, ``data/stream.py``); what they cannot is a batch size in the config, and
:func:`check_batch_sizes` names every such field, its value and the values that would work.

The dimensions, per task (``config.task``):

* every task: ``train.batch_size`` (pairs, ranked lists, unpaired examples, SFT examples,
  reward pairs, PPO / online-DPO prompts) and, when the run evaluates (``train.eval_every``
  > 0) or stores reference log-probs (``logprobs.precompute_reference``: computed in batches
  of it), ``train.eval_batch_size`` (0 = ``train.batch_size``). Rows are ``K x`` these (K = 2
  for pairs, the list length for ranked lists; online DPO samples
  ``online.samples_per_prompt`` completions of each prompt), so they split when these do.
* ``optim.grad_accum`` > 1: ``train.batch_size`` a multiple of it (strided micro-batches of
  ``train.batch_size / grad_accum`` examples); packed or prefix-shared rows cannot be split
  into micro-batches (``data.packing`` / ``data.prefix_sharing`` with ``grad_accum`` > 1 is
  refused).
* ``ppo``: ``train.batch_size`` a multiple of ``ppo.minibatches`` (each update reads
  ``batch_size / minibatches`` rollouts).
"""

from __future__ import annotations

import math

import jax
import ml_collections

from dpo_jax.sharding import BATCH_AXES, MESH_AXES


def data_parallel_size(mesh_shape, device_count: int, process_count: int = 1) -> int:
    """``lcm(product of the BATCH_AXES sizes, process_count)`` of a mesh shape (a mapping
    axis -> size, missing axes 1, one entry may be -1 = the remaining devices) over
    ``device_count`` devices. Raises ValueError for a shape the devices cannot fill."""
    dims = [int(mesh_shape.get(a, 1)) for a in MESH_AXES]
    if -1 in dims:
        known = math.prod(d for d in dims if d != -1)
        if dims.count(-1) > 1 or device_count % known:
            raise ValueError(f"mesh.shape {dict(mesh_shape)} cannot be filled by "
                             f"{device_count} devices")
        dims[dims.index(-1)] = device_count // known
    sizes = dict(zip(MESH_AXES, dims))
    return math.lcm(math.prod(sizes[a] for a in BATCH_AXES), int(process_count))


def _works(value: int, multiple: int) -> str:
    """The multiples of ``multiple`` nearest ``value`` (positive)."""
    low = (value // multiple) * multiple
    near = sorted({v for v in (low, low + multiple) if v > 0})
    return " or ".join(str(v) for v in near)


def batch_problems(config: ml_collections.ConfigDict, *, device_count: int,
                   process_count: int = 1) -> list[str]:
    """One line per batch dimension of ``config`` that the mesh cannot split (module doc);
    empty when all split."""
    t = config.train
    dp = data_parallel_size(config.mesh.shape, device_count, process_count)
    shape = {a: int(config.mesh.shape.get(a, 1)) for a in MESH_AXES}
    why = (f"a multiple of {dp}, the data-parallel size (batches are split over mesh axes "
           f"{' x '.join(BATCH_AXES)} of mesh.shape {shape} on {device_count} devices"
           + (f", in blocks over {process_count} processes" if process_count > 1 else "") + ")")
    batch = int(t.batch_size)
    sizes = [("train.batch_size", batch)]
    precompute = bool((config.get("logprobs") or {}).get("precompute_reference", False))
    if int(t.get("eval_every", 0) or 0) or precompute:
        sizes.append(("train.eval_batch_size", int(t.eval_batch_size or batch)))
    out = []
    for field, value in sizes:
        if value <= 0 or value % dp:
            out.append(f"{field}={value} must be {why}: use {_works(max(value, 1), dp)}")
    accum = int(config.optim.get("grad_accum", 1) or 1)
    if accum > 1:
        if batch % accum:
            out.append(f"train.batch_size={batch} must be a multiple of optim.grad_accum="
                       f"{accum} (strided micro-batches): use {_works(batch, math.lcm(accum, dp))}"
                       f" or another optim.grad_accum dividing it")
        data = config.get("data") or {}
        for field in ("packing", "prefix_sharing"):
            if data.get(field):
                out.append(f"data.{field}=True with optim.grad_accum={accum}: packed or "
                           f"prefix-shared rows cannot be split into micro-batches; set "
                           f"optim.grad_accum=1 or data.{field}=False")
    if config.get("task") == "ppo" and config.get("ppo") is not None:
        mb = int(config.ppo.get("minibatches", 1) or 1)
        if batch % (mb * accum):
            out.append(f"train.batch_size={batch} must be a multiple of ppo.minibatches={mb} "
                       f"times optim.grad_accum={accum} (rollouts per update, split into "
                       f"micro-batches): use {_works(batch, math.lcm(mb * accum, dp))}")
    return out


def check_batch_sizes(config: ml_collections.ConfigDict, *, device_count: int | None = None,
                      process_count: int | None = None) -> None:
    """Raise ValueError naming every batch-size field the mesh cannot split (module doc),
    its value and the values that would work; return None when all split. Defaults: this
    run's ``jax.device_count()`` and ``jax.process_count()``."""
    problems = batch_problems(
        config, device_count=jax.device_count() if device_count is None else device_count,
        process_count=jax.process_count() if process_count is None else process_count)
    if problems:
        raise ValueError("batch sizes the mesh cannot split:\n  " + "\n  ".join(problems))
