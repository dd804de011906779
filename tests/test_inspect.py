"""``python -m dpo_jax.inspect``: a tiny DPO run of the offline default's task with
``train.diagnostics=True``, then its report.

The run's own files are the reference: the report's table is the eval records of
metrics.jsonl, its top pairs the rows of the last ``eval_pairs`` file with the lowest chosen
log-prob change, decoded from the run's eval split (token ids for the synthetic task).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dpo_jax import eval_pairs, inspect
from dpo_jax.data import load_tokenised_pairs
from dpo_jax.data.config import read_data
from tests import runs


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("diag_run")
    c = runs.dpo_config(steps=4, eval_every=2, diagnostics=True)
    summary = runs.run(c, workdir)
    return str(workdir), c, summary


def test_run_writes_diagnostics_everywhere(run_dir):
    """Train and eval records, summary.json and one eval_pairs file per evaluation."""
    workdir, _, summary = run_dir
    records = runs.records(workdir)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval/loss" in r]
    assert len(train) == 4 and [r["step"] for r in evals] == [2, 4]
    for key in ("ches/mean", "ln_ches/mean", "logps_delta/chosen", "displacement/chosen_fell",
                "margins_hist/0_0.5"):
        assert all(key in r for r in train), key
        assert all("eval/" + key in r for r in evals), key
        assert key in summary["final_eval"] and key in summary["final_train"], key
    assert "ches/q50" in summary["final_eval"]
    # step 1 starts at the reference: no change, every margin 0 (bin [0, 0.5) holds the batch)
    assert train[0]["logps_delta/chosen"] == 0.0 and train[0]["margins_hist/0_0.5"] == 16
    by_step = eval_pairs.read(workdir)
    assert sorted(by_step) == [2, 4]
    assert [r["index"] for r in by_step[4]] == list(range(32))
    hist = sum(v for k, v in summary["final_eval"].items() if k.startswith("margins_hist/"))
    assert hist == 32
    np.testing.assert_allclose(summary["final_eval"]["logps_delta/chosen"],
                               np.mean([r["chosen_delta"] for r in by_step[4]]), rtol=1e-5)


def test_report_from_the_run(run_dir, tmp_path):
    workdir, c, _ = run_dir
    rep = inspect.inspect_run(workdir, str(tmp_path), top=3)
    rows = eval_pairs.read(workdir)[4]
    worst = sorted(rows, key=lambda r: r["chosen_delta"])[:3]
    assert [r["index"] for r in rep["top_pairs"]] == [r["index"] for r in worst]
    pairs, _ = load_tokenised_pairs(read_data(c.data), "eval")
    for r in rep["top_pairs"]:
        assert r["text"]["chosen"] == " ".join(map(str, pairs[r["index"]]["chosen"]))
    _, evals = inspect.read_metrics(workdir)
    assert [e["step"] for e in rep["evals"]] == [2, 4]
    assert rep["evals"][-1]["logps_delta/chosen"] == evals[-1]["logps_delta/chosen"]
    delta = [r["chosen_delta"] for r in rows]
    want = np.corrcoef([r["ln_ches"] for r in rows], delta)[0, 1]
    np.testing.assert_allclose(rep["correlations"]["pearson(ln_ches, chosen_delta)"], want)
    for name in rep["plots"]:
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    assert len(rep["plots"]) == 5
    text = (tmp_path / "report.md").read_text()
    assert f"eval pair {worst[0]['index']}:" in text and "ches_vs_delta.png" in text
    assert json.loads((tmp_path / "report.json").read_text())["eval_step"] == 4


def test_a_run_without_diagnostics_is_refused(tmp_path):
    """No eval_pairs: the error names the setting to turn on."""
    workdir = tmp_path / "plain"
    os.makedirs(workdir)
    (workdir / "config.json").write_text("{}")
    (workdir / "metrics.jsonl").write_text('{"step": 1, "loss": 0.7}\n')
    with pytest.raises(FileNotFoundError, match="train.diagnostics=True"):
        inspect.inspect_run(str(workdir), str(tmp_path / "out"))
