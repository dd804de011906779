"""The DPO step and loop: ln 2 at init, mesh invariance, exact accumulation, exact resume."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dpo_jax import train
from dpo_jax.config import base_config
from tests._interrupt import train_until_killed

jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(**train_overrides):
    c = base_config()
    c.model.overrides.n_layer = 2
    c.train.steps = 4
    c.train.batch_size = 16
    c.train.eval_every = 0
    c.train.log_every = 1
    c.train.checkpoint_every = 0
    c.train.async_checkpointing = False
    c.data.eval_size = 64
    for k, v in train_overrides.items():
        c.train[k] = v
    return c


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards(tmp_path):
    c = small_config(eval_every=1)
    run = train.Run(c, str(tmp_path))
    metrics = run.evaluate()
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert metrics[k] == pytest.approx(0.0, abs=1e-6)
    assert metrics["rewards/accuracies"] == 0.0  # ties are not wins


def _one_step(tmp_path, mesh_shape, model=None, logprobs=None, **optim):
    c = small_config(steps=1)
    c.mesh.shape = mesh_shape
    for k, v in (model or {}).items():
        c.model[k] = v
    for k, v in (logprobs or {}).items():
        c.logprobs[k] = v
    c.optim.name = "sgd"
    c.optim.lr = 1.0
    c.optim.warmup_steps = 0
    c.optim.max_grad_norm = 0.0
    for k, v in optim.items():
        c.optim[k] = v
    run = train.Run(c, str(tmp_path))
    before = _leaves(run.state.params)
    summary = run.train()
    after = _leaves(run.state.params)
    grads = [b - a for a, b in zip(after, before)]  # SGD with lr 1: params - grads
    return summary["final_train"], grads


@pytest.mark.parametrize("mesh_shape", [
    {"data": 1, "fsdp": 8, "tensor": 1},
    {"data": 2, "fsdp": 2, "tensor": 2},
])
def test_same_loss_and_gradients_on_every_mesh(tmp_path, mesh_shape):
    want_metrics, want_grads = _one_step(tmp_path / "ref", {"data": 8, "fsdp": 1, "tensor": 1})
    got_metrics, got_grads = _one_step(tmp_path / "other", mesh_shape)
    for k in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
        assert got_metrics[k] == pytest.approx(want_metrics[k], rel=1e-5, abs=1e-6), k
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_speed_switches_give_the_same_step_on_a_sharded_mesh(tmp_path):
    """Chunked attention (8-row blocks), remat dots_no_batch, unrolled layers and a separately
    tiled reference forward, on a data x fsdp x tensor mesh: the plain step's numbers."""
    want_metrics, want_grads = _one_step(tmp_path / "ref", {"data": 8, "fsdp": 1, "tensor": 1})
    run_dir = tmp_path / "fast"
    got_metrics, got_grads = _one_step(
        run_dir, {"data": 2, "fsdp": 2, "tensor": 2},
        model=dict(attention_impl="chunked", attention_chunk=8, remat="dots_no_batch",
                   scan_layers=False),
        logprobs=dict(forward_seq_chunk=4, forward_vocab_chunk=48))
    cfg = json.load(open(run_dir / "config.json"))
    assert cfg["model"]["attention_impl"] == "chunked" and cfg["logprobs"]["forward_seq_chunk"] == 4
    for k in ("loss", "rewards/margins", "logps/chosen", "grad_norm"):
        assert got_metrics[k] == pytest.approx(want_metrics[k], rel=1e-5, abs=1e-6), k
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_accumulating_four_micro_batches_equals_one_big_batch(tmp_path):
    want_metrics, want_grads = _one_step(tmp_path / "big", {"data": 8, "fsdp": 1, "tensor": 1})
    got_metrics, got_grads = _one_step(tmp_path / "micro", {"data": 8, "fsdp": 1, "tensor": 1},
                                       grad_accum=4)
    for k in ("loss", "rewards/accuracies", "logps/rejected", "grad_norm"):
        assert got_metrics[k] == pytest.approx(want_metrics[k], rel=1e-5, abs=1e-6), k
    for g, w in zip(got_grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, monkeypatch):
    def config():
        c = small_config(steps=6, checkpoint_every=2)
        c.optim.warmup_steps = 2
        return c

    full = train.Run(config(), str(tmp_path / "full"))
    full.train()
    want = _leaves(full.state.params)
    want_log = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]

    # Kill the second run when step 5 is dispatched, right after the checkpoint at step 4 (the
    # hardest moment for the one-step-late metrics: step 4's must already be in the log).
    train_until_killed(train.Run(config(), str(tmp_path / "cut")), 5)

    resumed = train.Run(config(), str(tmp_path / "cut"))
    assert resumed.start_step == 4
    resumed.train()
    got = _leaves(resumed.state.params)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    got_log = [json.loads(line) for line in open(tmp_path / "cut" / "metrics.jsonl")]
    assert [r["step"] for r in got_log] == [r["step"] for r in want_log]
    assert got_log[-1]["loss"] == want_log[-1]["loss"]


def test_offline_default_learns_the_synthetic_task(tmp_path):
    """The main job end to end (a shortened run): config.json, metrics, TensorBoard, accuracy."""
    workdir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "dpo_jax.main", "--config=configs/default.py:quick",
         f"--workdir={workdir}"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, XLA_FLAGS=""),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    config = json.load(open(workdir / "config.json"))
    assert config["loss"]["name"] == "sigmoid"
    summary = json.load(open(workdir / "summary.json"))
    final = summary["final_eval"]
    assert final["rewards/accuracies"] >= 0.8, summary
    assert final["loss"] < math.log(2) - 0.1, summary
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=0.05)
    assert any(k.startswith("eval/") for k in records[-1])
    assert os.listdir(workdir / "tb")
    assert "step 60/60" in out.stderr


def test_schedule_follows_the_papers_warmup():
    from dpo_jax.optim import OptimConfig, make_optimizer

    c = base_config()
    c.optim.lr = 1e-6
    c.optim.warmup_steps = 150
    _, schedule = make_optimizer(OptimConfig.from_config(c.optim), 1000)
    assert float(schedule(0)) == pytest.approx(1e-6 / 151)
    assert float(schedule(149)) == pytest.approx(1e-6 * 150 / 151)
    assert float(schedule(150)) == pytest.approx(1e-6)
    assert float(schedule(999)) == pytest.approx(1e-6)
    c.optim.schedule = "linear"
    _, schedule = make_optimizer(OptimConfig.from_config(c.optim), 1150)
    assert float(schedule(150)) == pytest.approx(1e-6)
    assert float(schedule(650)) == pytest.approx(0.5e-6)
    assert float(schedule(1150)) == pytest.approx(0.0, abs=1e-15)


def test_rmsprop_matches_pytorch_as_the_paper_ran_it():
    torch = pytest.importorskip("torch")
    from dpo_jax.optim import OptimConfig, make_optimizer

    c = base_config()
    c.optim.name = "rmsprop"
    c.optim.lr = 1e-2
    c.optim.warmup_steps = 0
    c.optim.max_grad_norm = 0.0
    tx, _ = make_optimizer(OptimConfig.from_config(c.optim), 10)
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5,)).astype(np.float32)
    grads = [rng.normal(size=(5,)).astype(np.float32) for _ in range(4)]
    params = {"w": jax.numpy.asarray(w)}
    state = tx.init(params)
    tw = torch.nn.Parameter(torch.tensor(w))
    topt = torch.optim.RMSprop([tw], lr=1e-2)  # alpha=0.99, eps=1e-8 outside the sqrt
    for g in grads:
        updates, state = tx.update({"w": jax.numpy.asarray(g)}, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        tw.grad = torch.tensor(g)
        topt.step()
    np.testing.assert_allclose(np.asarray(params["w"]), tw.detach().numpy(), rtol=1e-5, atol=1e-7)
