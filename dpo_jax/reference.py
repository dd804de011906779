"""Reference log-probs as data: computed once over the dataset, stored by fingerprint, and
handed to ``PreferencePipeline(reference=...)`` as plain arrays.

Why: with a frozen reference, the reference forward of every training step recomputes the same
numbers each epoch, and holding the reference parameters costs a second copy of the model in
device memory. Computing them once (one jitted, sharded forward-only pass per batch) removes
both: the training state then holds no reference parameters and the step reads
``batch["ref_logps"]``/``["ref_lengths"]`` ([2B] global layout, chosen then rejected; see
``step.pair_terms``).

``reference_logps`` keys the stored file by a fingerprint of everything that decides those
numbers: the tokenised pairs of every split, the tokenizer (name, pad id, files when it is a
local directory), the reference parameters (their source, dtypes, shapes and an on-device
checksum of their values), the model config and the forward-only log-prob settings. A resumed
run or a later run with the same fingerprint loads the file; any difference gives a new
fingerprint, hence a recomputation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax import data as data_lib
from dpo_jax import sharding as shard_lib
from dpo_jax.logprobs import max_scored_tokens
from dpo_jax.step import StepConfig, sequence_stats
from dpo_jax.train_state import param_checksum  # noqa: F401  (re-exported: reference.param_checksum)

SUBDIR = "reference_logps"  # the cache directory's conventional name inside a run's workdir

TokenPair = Mapping[str, np.ndarray]


def _hash_pairs(h, pairs: Sequence[TokenPair]) -> None:
    h.update(str(len(pairs)).encode())
    for p in pairs:
        for key in ("prompt", "chosen", "rejected"):
            a = np.asarray(p[key], np.int32)
            h.update(key.encode() + str(a.shape[0]).encode() + a.tobytes())


def _hash_tokenizer(h, tokenizer_name: str, pad_id: int) -> None:
    h.update(f"tokenizer={tokenizer_name!r} pad={pad_id}".encode())
    if tokenizer_name and os.path.isdir(tokenizer_name):
        for name in sorted(os.listdir(tokenizer_name)):
            path = os.path.join(tokenizer_name, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    h.update(name.encode() + f.read())


def fingerprint(pairs: Mapping[str, Sequence[TokenPair]], *, tokenizer_name: str, pad_id: int,
                ref_source: Mapping[str, Any], ref_checksum: list, model_config: Any,
                logprob_config: Any) -> str:
    """Hex sha256 of everything the stored reference log-probs depend on (see module doc).

    ``pairs``: split name -> tokenised pairs; ``ref_checksum``: ``param_checksum`` of the
    reference parameters; ``model_config``/``logprob_config``: dataclasses."""
    h = hashlib.sha256()
    for name in sorted(pairs):
        h.update(name.encode())
        _hash_pairs(h, pairs[name])
    _hash_tokenizer(h, tokenizer_name, pad_id)
    meta = dict(ref_source=dict(ref_source), ref_checksum=ref_checksum,
                model=dataclasses.asdict(model_config),
                logprobs=dataclasses.asdict(logprob_config))
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _logps_lengths(stats):
    B = stats.logps.shape[0] // 2
    return (jnp.stack([stats.logps[:B], stats.logps[B:]], axis=1),
            jnp.stack([stats.lengths[:B], stats.lengths[B:]], axis=1))


def pair_pass(fn, params, split_pairs: Sequence[TokenPair], data_cfg, step_cfg: StepConfig,
              mesh, global_batch_size: int, pad_id: int = 0) -> tuple[np.ndarray, ...]:
    """``fn(params, batch, max_scored) -> (a_B..., ...)`` (jittable, ``max_scored`` static;
    arrays with one leading row per pair) over every pair of ``split_pairs``: one pass
    in file order through an eval ``PreferencePipeline`` built from ``data_cfg`` (buckets,
    packing; the last batch padded with weight-0 copies of pair 0), one jitted call per batch
    over ``mesh``, outputs replicated. Returns the outputs stacked, one row per pair
    (``[N, ...]``, padding dropped). ``global_batch_size`` pairs per call; their rows and
    weights must divide over the mesh's batch axes."""
    replicated = shard_lib.replicated(mesh)
    jitted = jax.jit(fn, static_argnums=2, out_shardings=replicated)
    B = int(global_batch_size)
    pipe = data_lib.PreferencePipeline(
        list(split_pairs), data_cfg, train=False, global_batch_size=B,
        process_index=jax.process_index(), process_count=jax.process_count(), pad_id=pad_id,
        row_multiple=shard_lib.num_batch_shards(mesh))
    parts = []
    for batch_np in pipe:
        batch_np = shard_lib.pad_for_context(batch_np, mesh)
        max_scored = None
        if step_cfg.logprobs.scored_only:
            max_scored = max_scored_tokens(batch_np["loss_mask"])
            if jax.process_count() > 1:  # every process must compile the same program
                from jax.experimental import multihost_utils

                max_scored = int(np.max(multihost_utils.process_allgather(
                    np.asarray(max_scored))))
        batch = data_lib.to_global(batch_np, shard_lib.batch_shardings(batch_np, mesh))
        parts.append(jax.device_get(jitted(params, batch, max_scored)))
    return tuple(np.concatenate(a)[:len(split_pairs)] for a in zip(*parts))


def compute_pair_logps(model, params, pairs: Mapping[str, Sequence[TokenPair]], data_cfg,
                       step_cfg: StepConfig, mesh, global_batch_size: int, pad_id: int = 0
                       ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{split: (logps_N2, lengths_N2)}`` float32 (column 0 chosen, 1 rejected, one row per
    pair): summed response log-probs under ``params`` (nats) and scored token counts.

    Per split, one :func:`pair_pass` with the forward-only log-prob settings
    (``step_cfg.forward_logprobs``), as ``step.sequence_stats(forward_only=True)`` computes the
    reference inside a training step. ``global_batch_size`` pairs per forward."""

    def forward(p, batch, max_scored):
        return _logps_lengths(sequence_stats(model, p, batch, step_cfg, max_scored,
                                             forward_only=True))

    return {split: tuple(a.astype(np.float32) for a in pair_pass(
        forward, params, split_pairs, data_cfg, step_cfg, mesh, global_batch_size, pad_id))
        for split, split_pairs in pairs.items()}


def load_or_compute(path: str, compute) -> tuple[dict[str, np.ndarray], bool]:
    """The arrays stored at ``path`` (an ``.npz``), or ``compute()`` saved there by process 0;
    and whether they were reused."""
    if os.path.exists(path):
        with np.load(path) as f:
            return {k: f[k] for k in f.files}, True
    arrays = compute()
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written file under the key
    return arrays, False


def reference_logps(model, params, pairs: Mapping[str, Sequence[TokenPair]], *, data_cfg,
                    step_cfg: StepConfig, mesh, batch_size: int, cache_dir: str,
                    tokenizer_name: str = "", pad_id: int = 0,
                    ref_source: Mapping[str, Any] | None = None
                    ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, Any]]:
    """Reference log-probs of every pair of every split, loaded from ``cache_dir`` or computed
    (``compute_pair_logps``) and stored there under the fingerprint of all their inputs.

    Args:
      model, params: the reference model and its (sharded) parameters.
      pairs: split name -> tokenised pairs (``{"prompt", "chosen", "rejected"}`` int32).
      data_cfg: the data config (bucketing / packing of the forward's batches).
      step_cfg: the run's ``StepConfig``; its forward-only log-prob settings are used.
      mesh: the device mesh; batch_size: pairs per forward (2B rows divide over the mesh's
        batch axes).
      cache_dir: directory of the stored ``<fingerprint[:32]>.npz`` files (created if absent).
      tokenizer_name, pad_id: the tokenizer the pairs came from ('' for the synthetic task).
      ref_source: where the parameters came from (paths, dtype), JSON-able; fingerprinted.

    Returns ``({split: (logps_N2, lengths_N2)}, {"path", "fingerprint", "reused"})``: float32
    arrays with one row per pair in the split's order (column 0 chosen, 1 rejected), ready
    for ``PreferencePipeline(reference=...)``."""
    fp = fingerprint(pairs, tokenizer_name=tokenizer_name, pad_id=pad_id,
                     ref_source=ref_source or {}, ref_checksum=param_checksum(params),
                     model_config=model.cfg, logprob_config=step_cfg.forward_logprobs)
    path = os.path.join(cache_dir, f"{fp[:32]}.npz")

    def compute() -> dict[str, np.ndarray]:
        got = compute_pair_logps(model, params, pairs, data_cfg, step_cfg, mesh, batch_size,
                                 pad_id)
        return {f"{split}_{name}": a for split, arrays in got.items()
                for name, a in zip(("logps", "lengths"), arrays)}

    arrays, reused = load_or_compute(path, compute)
    stored = {split: (arrays[f"{split}_logps"], arrays[f"{split}_lengths"]) for split in pairs}
    return stored, {"path": path, "fingerprint": fp, "reused": reused}
