"""Weights & Biases, optional: ``log.wandb_project`` streams the run's config and the records of
metrics.jsonl (WANDB_MODE=offline into a temporary directory, read back from the run file)."""

import glob
import json
import math
import os
import struct
import sys
import time

import pytest

from dpo_jax.config import base_config
from dpo_jax.metrics import MetricWriter, WandbSink


def _records(run_file):
    """The protobuf records of an offline ``.wandb`` file (W&B's leveldb-style log: a 7-byte
    file header, 32 KiB blocks, each chunk a 7-byte header crc32 / length / type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(run_file, "rb").read()
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # a full record, or the last chunk of one
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _history_and_config(wandb_dir):
    (run_file,) = glob.glob(os.path.join(wandb_dir, "wandb", "offline-run-*", "run-*.wandb"))
    deadline = time.time() + 30  # wandb's writer process may still be flushing after finish()
    while not any(r.WhichOneof("record_type") == "exit" for r in _records(run_file)):
        assert time.time() < deadline, f"{run_file} never got its exit record"
        time.sleep(0.2)
    history, config = [], {}
    for rec in _records(run_file):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in rec.history.item})
        elif kind in ("run", "config"):
            items = rec.run.config.update if kind == "run" else rec.config.update
            config.update({i.key: json.loads(i.value_json) for i in items})
    return history, config


@pytest.fixture
def offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    (tmp_path / "wb").mkdir()
    return tmp_path / "wb"


def _workdir(tmp_path, project):
    c = base_config()
    c.log.wandb_project = project
    workdir = tmp_path / "run"
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text(c.to_json())
    return workdir


def test_metrics_and_config_stream_to_wandb(tmp_path, offline):
    workdir = _workdir(tmp_path, "dpo-jax-test")
    writer = MetricWriter(str(workdir), tensorboard=False)
    assert writer.wandb is not None
    for step in (1, 2, 3):
        writer.write(step, {"loss": 0.7 / step, "rewards/accuracies": 0.5 + 0.1 * step,
                            "grad_norm": float("nan") if step == 2 else 1.0})
    writer.write(3, {"rewards/accuracies": 0.75}, prefix="eval/")
    writer.close()
    history, config = _history_and_config(offline)
    jsonl = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
    # W&B merges the records of one step into one row; every value of metrics.jsonl is there
    by_step = {}
    for row in history:
        by_step.setdefault(row["_step"], {}).update(row)
    assert sorted(by_step) == [1, 2, 3]
    for rec in jsonl:
        for key, value in rec.items():
            got = by_step[rec["step"]][key if key != "step" else "_step"]
            assert got == value or (math.isnan(value) and math.isnan(got)), (key, got, value)
    assert config["log"]["wandb_project"] == "dpo-jax-test"
    assert config["train"]["steps"] == base_config().train.steps
    run_id = (workdir / "wandb_run_id").read_text().strip()
    assert glob.glob(os.path.join(offline, "wandb", f"offline-run-*-{run_id}"))


def test_off_by_default_on_other_processes_and_without_the_extra(tmp_path, offline,
                                                                 monkeypatch):
    workdir = _workdir(tmp_path, "")
    writer = MetricWriter(str(workdir), tensorboard=False)
    assert writer.wandb is None
    writer.close()
    other = _workdir(tmp_path / "p1", "dpo-jax-test")
    writer = MetricWriter(str(other), tensorboard=False, enabled=False)  # process != 0
    assert writer.wandb is None and not os.listdir(offline)
    monkeypatch.setitem(sys.modules, "wandb", None)  # wandb not installed
    with pytest.raises(ImportError, match=r'pip install -e "\.\[wandb\]"'):
        WandbSink(str(other), "dpo-jax-test")


def test_imdb_frontier_plot_goes_to_the_pipeline_run(tmp_path, offline):
    import numpy as np
    from matplotlib import pyplot as plt

    from dpo_jax.proj.imdb.evaluate import log_frontier_to_wandb

    c = base_config()
    workdir = tmp_path / "imdb"
    workdir.mkdir()
    plt.plot(np.arange(3), np.arange(3))
    plt.savefig(workdir / "frontier.png")
    plt.close()
    assert not log_frontier_to_wandb(c, workdir)  # off by default
    c.log.wandb_project = "dpo-jax-test"
    assert log_frontier_to_wandb(c, workdir)
    history, config = _history_and_config(offline)
    images = [row for row in history if "imdb/frontier/_type" in row]
    assert len(images) == 1 and images[0]["imdb/frontier/_type"] == "image-file"
    (run_dir,) = glob.glob(os.path.join(offline, "wandb", "offline-run-*"))
    assert os.path.exists(os.path.join(run_dir, "files", images[0]["imdb/frontier/path"]))
    assert config["log"]["wandb_project"] == "dpo-jax-test"
