"""The DPO step and task: ln 2 at init, mesh invariance, speed switches and gradient accumulation
(the step function called directly), the offline default learning end to end, the optimizer."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from dpo_jax import eval_metrics
from dpo_jax.config import base_config
from dpo_jax.optim import OptimConfig, make_optimizer
from dpo_jax.step import make_eval_step, make_train_step
from dpo_jax.train_state import Frozen
from tests import helpers as h

jax.config.update("jax_default_matmul_precision", "highest")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
    model = h.tiny_model()
    params = h.init_params(model)
    batch, bound = h.device_batch(h.pair_batch(h.synthetic_pairs(16)))
    sums = jax.device_get(make_eval_step(model, h.loss_config(), h.step_config())(
        params, Frozen(reference=params), batch, bound))
    means = eval_metrics.means(eval_metrics.add({}, sums))
    assert means["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert means[k] == pytest.approx(0.0, abs=1e-6)
    assert means["rewards/accuracies"] == 0.0  # ties are not wins


def _one_step(mesh_shape, model_fields=None, forward=None, grad_accum=1):
    """Metrics and gradients of one SGD (lr 1) step of the DPO step function on ``mesh_shape``;
    the reference is a perturbed copy of the policy, so rewards are not zero."""
    model = h.tiny_model(**(model_fields or {}))
    params = h.init_params(model)
    tx, schedule = h.optimizer()
    mesh = h.mesh(mesh_shape)
    state = h.train_state(model, params, tx, ref_params=h.perturbed(params), mesh_=mesh)
    batch, bound = h.device_batch(h.pair_batch(h.synthetic_pairs(16)), mesh)
    cfg = h.step_config(grad_accum=grad_accum, scored_only=True, seq_chunk=16,
                        forward_logprobs=forward)
    new, metrics = jax.jit(make_train_step(model, h.loss_config(), tx, schedule, cfg),
                           static_argnums=2)(state, batch, bound)
    grads = [a - b for a, b in zip(h.leaves(params), h.leaves(new.trainable))]
    return {k: float(v) for k, v in jax.device_get(metrics).items()}, grads


def _assert_same_step(got, want):
    (got_metrics, got_grads), (want_metrics, want_grads) = got, want
    for k in ("loss", "rewards/margins", "rewards/accuracies", "logps/chosen", "grad_norm"):
        assert got_metrics[k] == pytest.approx(want_metrics[k], rel=1e-5, abs=1e-6), k
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def data_parallel_step():
    return _one_step({"data": 8, "fsdp": 1, "tensor": 1})


@pytest.mark.parametrize("mesh_shape", [
    {"data": 1, "fsdp": 8, "tensor": 1},
    {"data": 2, "fsdp": 2, "tensor": 2},
])
def test_same_loss_and_gradients_on_every_mesh(data_parallel_step, mesh_shape):
    _assert_same_step(_one_step(mesh_shape), data_parallel_step)


def test_speed_switches_give_the_same_step_on_a_sharded_mesh(data_parallel_step):
    """Chunked attention (8-row blocks), remat dots_no_batch, unrolled layers and a separately
    tiled forward-only (reference) head, on a data x fsdp x tensor mesh: the plain step."""
    from dpo_jax.logprobs import LogprobConfig

    got = _one_step({"data": 2, "fsdp": 2, "tensor": 2},
                    model_fields=dict(attention_impl="chunked", attention_chunk=8,
                                      remat="dots_no_batch", scan_layers=False),
                    forward=LogprobConfig(scored_only=True, seq_chunk=4, vocab_chunk=48))
    _assert_same_step(got, data_parallel_step)


@pytest.mark.slow  # the suite's 8-minute budget: a sibling test covers the kind
def test_accumulating_four_micro_batches_equals_one_big_batch(data_parallel_step):
    _assert_same_step(_one_step({"data": 8, "fsdp": 1, "tensor": 1}, grad_accum=4),
                      data_parallel_step)


def test_offline_default_learns_the_synthetic_task(tmp_path):
    """The main job end to end (the 60-step quick variant): config.json, metrics, TensorBoard,
    summary; the loss starts at exactly ln 2 (policy = reference) and accuracy ends near 1."""
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
    assert summary["first_train"]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    final = summary["final_eval"]
    assert final["rewards/accuracies"] >= 0.97, summary  # measured 0.990
    assert final["loss"] < 0.3, summary  # measured 0.218
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in records if "loss" in r] == list(range(10, 61, 10))
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [60]
    assert evals[0]["eval/loss"] == pytest.approx(final["loss"])
    assert os.listdir(workdir / "tb")
    assert "step 60/60" in out.stderr


def test_schedule_follows_the_papers_warmup():
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


@pytest.mark.torch
def test_rmsprop_matches_pytorch_as_the_paper_ran_it():
    torch = pytest.importorskip("torch")
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


@pytest.mark.parametrize("field,value,reason", [
    ("vocab_size", 64, "token_id_out_of_range"),  # synthetic ids reach 127
    ("max_len", 16, "sequence_too_long"),  # learned positions: GPT-2 shape
])
def test_data_that_does_not_fit_the_model_stops_the_task_at_start(tmp_path, field, value, reason):
    """Checked before anything is compiled or trained: no checkpoint, no metrics."""
    from dpo_jax import train
    from dpo_jax.data import DataError
    from tests import runs

    c = runs.dpo_config()
    c.model.overrides[field] = value
    with pytest.raises(DataError, match="model.overrides") as e:
        train.train_and_evaluate(c, str(tmp_path))
    assert e.value.reason == reason
    assert not os.path.exists(tmp_path / "checkpoints") and not runs.records(tmp_path)
