"""Batch sizes the mesh cannot split: one start-up check naming the fields and the values that
would work, before the workdir is written; packed rows are padded to the data-parallel size."""

import functools
import os

import numpy as np
import pytest

from dpo_jax import online
from dpo_jax.batch_sizes import batch_problems, data_parallel_size
from dpo_jax.config import base_config
from tests import helpers, runs

MESHES = {"dp": ({"data": 8, "fsdp": 1, "tensor": 1}, 8),
          "fsdp": ({"data": 1, "fsdp": 8, "tensor": 1}, 8),
          "mixed": ({"data": 2, "fsdp": 2, "tensor": 2}, 4)}


def _online_config(**train):
    c = runs.tiny(base_config(), **train)
    c.task = "online_dpo"
    c.online = online.default_online_config()
    return c


CONFIGS = dict(runs.CONFIGS, online_dpo=_online_config,
               ranked=functools.partial(runs.format_config, "ranked", "plackett_luce"),
               kto=functools.partial(runs.format_config, "unpaired", "kto"))


def _nearest_multiples(value, dp):
    """The multiples of dp on either side of value, by counting."""
    below = [v for v in range(1, value + 1) if v % dp == 0]
    above = [v for v in range(value, value + dp + 1) if v % dp == 0]
    return sorted(set(below[-1:] + above[:1]))


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
@pytest.mark.parametrize("task", sorted(CONFIGS))
def test_indivisible_batch_sizes_are_named_before_the_workdir_is_written(tmp_path, mesh_name,
                                                                         task):
    shape, dp = MESHES[mesh_name]
    assert data_parallel_size(shape, 8) == dp
    batch, evals = dp + dp // 2, 3 * dp - 1  # 12, 23 on 8 devices; 6, 11 on the mixed mesh
    c = CONFIGS[task](batch_size=batch, eval_every=2, eval_batch_size=evals)
    c.mesh.shape = shape
    if task == "ppo":
        c.ppo.minibatches = 1
    workdir = tmp_path / "run"
    with pytest.raises(ValueError) as e:
        runs.run(c, workdir)
    message = str(e.value)
    for field, value in (("train.batch_size", batch), ("train.eval_batch_size", evals)):
        want = " or ".join(map(str, _nearest_multiples(value, dp)))
        assert f"{field}={value} must be a multiple of {dp}" in message
        assert f"use {want}" in message
    assert "data x fsdp" in message
    assert not os.path.exists(workdir)
    # The same sizes rounded to the multiples pass the check.
    c.train.batch_size, c.train.eval_batch_size = 2 * dp, dp
    assert batch_problems(c, device_count=8) == []


def test_eval_batch_size_is_checked_only_when_the_run_reads_it():
    c = runs.dpo_config(batch_size=8, eval_every=0, eval_batch_size=3)
    c.mesh.shape = {"data": 8}
    assert batch_problems(c, device_count=8) == []
    c.logprobs.precompute_reference = True  # stored in batches of eval_batch_size
    assert [p.split("=")[0] for p in batch_problems(c, device_count=8)] == [
        "train.eval_batch_size"]
    c.train.eval_batch_size = 0  # 0 = the train batch size
    assert batch_problems(c, device_count=8) == []


def test_processes_and_minus_one_axes_count():
    shape = {"data": 1, "fsdp": -1, "tensor": 2}
    assert data_parallel_size(shape, 8) == 4 and data_parallel_size(shape, 8, 8) == 8
    assert data_parallel_size({"tensor": 8}, 8, 2) == 2  # blocks over processes
    c = runs.dpo_config(batch_size=6)
    c.mesh.shape = {"data": 1, "fsdp": 1, "tensor": 8}
    assert batch_problems(c, device_count=8) == []
    (problem,) = batch_problems(c, device_count=8, process_count=4)
    assert "train.batch_size=6 must be a multiple of 4" in problem and "over 4 processes" in problem
    assert "use 4 or 8" in problem
    with pytest.raises(ValueError, match="cannot be filled"):
        data_parallel_size({"data": -1, "fsdp": 3}, 8)


def test_micro_batches_and_ppo_minibatches_are_named():
    c = runs.dpo_config(batch_size=24)
    c.mesh.shape = {"data": 2, "fsdp": 2, "tensor": 2}
    c.optim.grad_accum = 5
    (problem,) = batch_problems(c, device_count=8)
    assert "train.batch_size=24 must be a multiple of optim.grad_accum=5" in problem
    assert "use 20 or 40" in problem  # multiples of lcm(5, 4)
    c.optim.grad_accum, c.data.packing = 3, True
    (problem,) = batch_problems(c, device_count=8)
    assert "data.packing=True with optim.grad_accum=3" in problem
    p = runs.ppo_config(batch_size=24)
    p.mesh.shape = {"data": 8}
    p.ppo.minibatches = 5
    problems = batch_problems(p, device_count=8)
    assert any("ppo.minibatches=5" in x and "use 40" in x for x in problems)
    assert any("train.batch_size=24" in x and "multiple of 8" not in x for x in problems)


@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_packed_rows_are_padded_to_the_data_parallel_size(prefix_sharing):
    pairs = helpers.synthetic_pairs(40, seed=3)

    def rows(dp):
        pipe = helpers.PreferencePipeline(
            pairs, helpers.data_config(packing=True, prefix_sharing=prefix_sharing,
                                       pack_length=64, buckets="64"),
            train=True, global_batch_size=8, pad_id=0, row_multiple=dp)
        return [next(pipe)["input_ids"].shape[0] for _ in range(6)]

    unpadded = rows(1)
    assert any(r % 8 for r in unpadded), unpadded  # what the mesh could not split
    for dp in (4, 8):
        padded = rows(dp)
        assert all(r % dp == 0 and r - dp < u <= r for r, u in zip(padded, unpadded)), padded


@pytest.mark.slow  # 13 s; the padded plan itself is pinned by the test above
def test_packed_dpo_run_on_eight_devices(tmp_path):
    """A packed DPO run whose packed row counts are not multiples of 8 unless padded: the 16
    sequences of a batch pack into 4 rows of 128 (one 128 bucket, so packing is cheaper than
    16 unpacked rows), which the 8-device mesh cannot split; the run pads them to 8."""
    c = runs.dpo_config(steps=2, batch_size=8, eval_every=2, eval_batch_size=8)
    c.mesh.shape = {"data": 8, "fsdp": 1, "tensor": 1}
    c.data.update(packing=True, pack_length=128, buckets="128")
    summary = runs.run(c, tmp_path / "run")
    assert summary["finished"] and np.isfinite(summary["final_eval"]["loss"])
    for split in ("train", "eval"):
        shapes = summary["data"][split]["shapes_seen"]
        rows = [int(s.split("x")[0]) for s in shapes]
        assert all(r % 8 == 0 and r < 16 for r in rows), shapes  # packed, and padded to 8
