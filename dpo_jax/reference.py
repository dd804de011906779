"""Reference log-probs computed once over the dataset, stored, and attached to every batch.

Why: with a frozen reference, the reference forward of every training step recomputes the same
numbers each epoch, and holding the reference parameters costs a second copy of the model in
device memory. Precomputing them once (one jitted, sharded forward per pair) removes both: the
``Run`` then holds no ``ref_params`` and its step reads ``batch["ref_logps"]``/``["ref_lengths"]``
([2B] global layout, chosen then rejected; see ``step.pair_terms``).

The stored file is keyed by a fingerprint of everything that decides those numbers: the tokenised
pairs of both splits, the tokenizer (name, pad id, files when it is a local directory), the
reference parameters (their source and an on-device checksum of their values), the model config,
the reference storage dtype and the log-prob settings. A resumed run or a later run with the same
fingerprint loads the file; any difference gives a new fingerprint, hence a recomputation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from dpo_jax import data as data_lib
from dpo_jax import sharding as shard_lib
from dpo_jax.logprobs import max_scored_tokens
from dpo_jax.step import sequence_stats

SUBDIR = "reference_logps"


def param_checksum(params: Any) -> list[list[float]]:
    """Per leaf ``[sum x, sum x^2, sum x*sin(i)]`` in float32, computed on device.

    A cheap stand-in for hashing every byte (which would move the whole model to the host): the
    third term depends on the position of each value, so permutations change it too."""

    def leaf(x):
        x = x.astype(jnp.float32).reshape(-1)
        w = jnp.sin(jnp.arange(x.shape[0], dtype=jnp.float32))
        return jnp.stack([x.sum(), (x * x).sum(), (x * w).sum()])

    sums = jax.jit(lambda p: jax.tree.map(leaf, p))(params)
    return [np.asarray(jax.device_get(s)).round(6).tolist() for s in jax.tree.leaves(sums)]


def _hash_pairs(h, pairs) -> None:
    h.update(str(len(pairs)).encode())
    for p in pairs:
        for key in ("prompt", "chosen", "rejected"):
            a = np.asarray(p[key], np.int32)
            h.update(key.encode() + str(a.shape[0]).encode() + a.tobytes())


def _hash_tokenizer(h, tokenizer: str, pad_id: int) -> None:
    h.update(f"tokenizer={tokenizer!r} pad={pad_id}".encode())
    if tokenizer and os.path.isdir(tokenizer):
        for name in sorted(os.listdir(tokenizer)):
            path = os.path.join(tokenizer, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    h.update(name.encode() + f.read())


def fingerprint(splits: dict[str, list], *, tokenizer: str, pad_id: int, ref_source: dict,
                ref_checksum: list, model_config: Any, ref_param_dtype: str,
                logprob_config: Any) -> str:
    """Hex sha256 of everything the stored reference log-probs depend on (see module doc)."""
    h = hashlib.sha256()
    for name in sorted(splits):
        h.update(name.encode())
        _hash_pairs(h, splits[name])
    _hash_tokenizer(h, tokenizer, pad_id)
    meta = dict(ref_source=ref_source, ref_checksum=ref_checksum,
                model=dataclasses.asdict(model_config), ref_param_dtype=ref_param_dtype,
                logprobs=dataclasses.asdict(logprob_config))
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()


def compute_pair_logps(model, ref_params, pairs: list, data_cfg, step_cfg, mesh,
                       global_batch_size: int) -> dict[str, np.ndarray]:
    """``{"logps": [N, 2], "lengths": [N, 2]}`` (column 0 chosen, 1 rejected) for every pair.

    One pass in file order through an eval-mode pipeline (pads the last batch with weight-0
    copies of pair 0), one jitted forward per batch with the trainer's log-prob settings."""
    pipe = data_lib.PreferencePipeline(
        pairs, data_cfg, train=False, global_batch_size=global_batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())
    replicated = shard_lib.replicated(mesh)
    forward = jax.jit(lambda p, b, n: sequence_stats(model, p, b, step_cfg, n, forward_only=True),
                      static_argnums=2, out_shardings=(replicated, replicated))
    n, B = len(pairs), global_batch_size
    logps = np.zeros((pipe.num_batches * B, 2), np.float32)
    lengths = np.zeros((pipe.num_batches * B, 2), np.float32)
    for i, batch_np in enumerate(pipe):
        num_scored = max_scored_tokens(batch_np["loss_mask"]) if step_cfg.logprobs.scored_only else None
        if num_scored is not None and jax.process_count() > 1:
            from jax.experimental import multihost_utils

            num_scored = int(np.max(multihost_utils.process_allgather(np.asarray(num_scored))))
        batch = data_lib.to_global(batch_np, shard_lib.batch_shardings(batch_np, mesh))
        lp, ln = jax.device_get(forward(ref_params, batch, num_scored))
        logps[i * B:(i + 1) * B] = np.stack([lp[:B], lp[B:]], axis=1)
        lengths[i * B:(i + 1) * B] = np.stack([ln[:B], ln[B:]], axis=1)
    return {"logps": logps[:n], "lengths": lengths[:n]}


def load_or_compute(path: str, compute) -> tuple[dict[str, np.ndarray], bool]:
    """The arrays stored at ``path``, or ``compute()`` saved there; and whether it was reused."""
    if os.path.exists(path):
        with np.load(path) as f:
            return {k: f[k] for k in f.files}, True
    arrays = compute()
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, **arrays)
        os.replace(tmp, path)  # atomic: a crash never leaves a half-written file under the key
    return arrays, False


def attach(pipeline, logps_N2: np.ndarray, lengths_N2: np.ndarray) -> None:
    """Make ``pipeline`` add ``ref_logps``/``ref_lengths`` [2B] (chosen then rejected)."""

    def per_pair(idx: np.ndarray) -> dict[str, np.ndarray]:
        return {"ref_logps": np.concatenate([logps_N2[idx, 0], logps_N2[idx, 1]]),
                "ref_lengths": np.concatenate([lengths_N2[idx, 0], lengths_N2[idx, 1]])}

    pipeline.per_pair = per_pair


def precompute_for_run(run, ref_params, ref_source: dict) -> dict[str, Any]:
    """Reference log-probs of ``run``'s train (and eval) pairs, loaded or computed, attached to
    its pipelines. Returns ``{"path", "fingerprint", "reused"}`` for logging and tests."""
    pipes = {"train": run.train_data}
    if run.eval_data is not None:
        pipes["eval"] = run.eval_data
    cfg = run.config
    fp = fingerprint(
        {k: p.pairs for k, p in pipes.items()}, tokenizer=str(cfg.data.tokenizer),
        pad_id=run.train_data.pad_id, ref_source=ref_source,
        ref_checksum=param_checksum(ref_params), model_config=run.model.cfg,
        ref_param_dtype=str(cfg.model.ref_param_dtype),
        logprob_config=run.step_cfg.no_grad_logprobs)
    path = os.path.join(run.workdir, SUBDIR, f"{fp[:32]}.npz")
    batch = int(cfg.train.eval_batch_size or cfg.train.batch_size)

    def compute():
        out = {}
        for split, pipe in pipes.items():
            got = compute_pair_logps(run.model, ref_params, pipe.pairs, cfg.data, run.step_cfg,
                                     run.mesh, batch)
            out[f"{split}_logps"], out[f"{split}_lengths"] = got["logps"], got["lengths"]
        return out

    arrays, reused = load_or_compute(path, compute)
    for split, pipe in pipes.items():
        attach(pipe, arrays[f"{split}_logps"], arrays[f"{split}_lengths"])
    logging.info("reference log-probs %s %s", "reused from" if reused else "computed into", path)
    return {"path": path, "fingerprint": fp, "reused": reused}
