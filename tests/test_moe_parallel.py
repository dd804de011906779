"""Expert parallelism (models/moe_parallel.py, `moe_expert_axis`): experts split over one mesh
axis, copies exchanged by all_to_all under shard_map, equal to the single-device sparse
dispatch to float32 round-off on the 8 fake CPU devices: the dispatch and its gradients, a DPO
train step (metrics and update), and KV-cache sampling, on an expert axis of 8 (1 x 8 x 1)
and on 2 x 4 (data x fsdp, experts over fsdp); the dispatch also with the experts over tensor
(2 x 2 x 2); a whole run (slow) and the run's check of the axis size."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import sampling
from dpo_jax.models import Model, moe_dispatch, moe_parallel
from dpo_jax.models.config import preset
from dpo_jax.step import make_train_step
from tests import helpers, runs

MESHES = {"ep8": ({"data": 1, "fsdp": 8, "tensor": 1}, "fsdp"),
          "dp2xep4": ({"data": 2, "fsdp": 4, "tensor": 1}, "fsdp")}


def _cfg(**kw):
    return preset("tiny-llama", n_kv_head=2, rope_scaling=None, family="mixtral", n_experts=8,
                  n_experts_per_tok=2, moe_d_ff=16, moe_tile=16, **kw)


def _params(model: Model):
    p = helpers.init_params(model, 0)
    return jax.tree.map(lambda x: x * 8 if x.ndim >= 3 else x, p)  # experts and router


@pytest.mark.parametrize("mesh_shape,axis,kernel", [
    ((1, 8, 1), "fsdp", "tiled"), ((2, 2, 2), "tensor", "ragged_dot")])
def test_dispatch_and_gradients_equal_single_device(mesh_shape, axis, kernel):
    """expert_parallel on 29 tokens (not a multiple of the 8 devices: padded), 8 experts top-2,
    most copies on expert 1 (so one device receives more than its share, and one expert
    none), equals sparse_experts, and so do the gradients of every input."""
    rng = np.random.default_rng(0)
    T, D, F, E, K = 29, 6, 5, 8, 2
    x, index, weight, gate, up, down = helpers.routed_experts(rng, T, E, [0, 2, 4, 7])
    cot = rng.normal(size=(T, D)).astype(np.float32)
    args = (x, weight, gate, up, down)
    vg = lambda f: jax.jit(jax.value_and_grad(lambda *a: jnp.sum(f(*a) * cot), argnums=range(5)))
    ref = lambda *a: moe_dispatch.sparse_experts("silu", a[0], index, *a[1:], kernel=kernel,
                                                 tile=4)
    want, g_want = vg(ref)(*args)
    mesh = helpers.mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
    with jax.set_mesh(mesh):
        ep = lambda *a: moe_parallel.expert_parallel(
            "silu", a[0], index, *a[1:], mesh=moe_parallel.expert_mesh(axis), axis=axis,
            kernel=kernel, tile=4)
        y = jax.jit(ep)(*args)
        got, g_got = vg(ep)(*args)
    np.testing.assert_allclose(y, jax.jit(ref)(*args), rtol=1e-5, atol=1e-5)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_expert_mesh_and_errors():
    """No mesh context, or an axis of one device: no exchange (None); an axis whose size
    does not divide the experts, or moe_expert_axis off a mesh axis or with dense: errors."""
    assert moe_parallel.expert_mesh("fsdp") is None
    with jax.set_mesh(helpers.mesh({"data": 8, "fsdp": 1, "tensor": 1})):
        assert moe_parallel.expert_mesh("fsdp") is None
        assert moe_parallel.expert_mesh(None) is None
        mesh = moe_parallel.expert_mesh("data")
        assert mesh is not None and mesh.shape["data"] == 8
        w = jnp.zeros((6, 4, 3))
        with pytest.raises(ValueError, match="8 devices, which do not divide the 6 experts"):
            moe_parallel.expert_parallel("silu", jnp.zeros((8, 4)), jnp.zeros((8, 2), int),
                                         jnp.zeros((8, 2)), w, w, jnp.zeros((6, 3, 4)),
                                         mesh=mesh, axis="data")
    with pytest.raises(ValueError, match="moe_expert_axis"):
        _cfg(moe_expert_axis="expert")
    with pytest.raises(ValueError, match="moe_expert_axis"):
        _cfg(moe_expert_axis="fsdp", moe_impl="dense")


@functools.cache
def _dpo_step(mesh_name: str | None):
    """(metrics, new parameters) of one DPO step (sigmoid, router loss 0.1; SGD lr 1, so the
    update is the gradient) on the data mesh without expert parallelism (None), or on
    MESHES[mesh_name] with the experts over its axis (state sharded by the default rules,
    `expert` -> fsdp); checks that the program holds an all_to_all exactly with the latter."""
    shape, axis = MESHES[mesh_name] if mesh_name else ({"data": 8}, None)
    batch_np = helpers.pair_batch(helpers.synthetic_pairs(8), buckets="48")
    params = _params(Model(_cfg()))
    tx, schedule = helpers.optimizer()
    mesh = helpers.mesh(shape)
    model = Model(_cfg(moe_expert_axis=axis))
    state = helpers.train_state(model, params, tx, helpers.perturbed(params, 0.05), mesh)
    batch, max_scored = helpers.device_batch(batch_np, mesh)
    step = jax.jit(make_train_step(model, helpers.loss_config(router_aux_loss_coef=0.1), tx,
                                   schedule, helpers.step_config()), static_argnums=2)
    with jax.set_mesh(mesh):
        lowered = step.lower(state, batch, max_scored)
        assert ("all_to_all" in lowered.as_text()) == bool(axis)  # the exchange
        new_state, metrics = lowered.compile()(state, batch)
    update = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b,
                          jax.device_get(new_state.trainable), params)
    return jax.device_get(metrics), update


# Each test's second mesh is slow (a compile each); the fast suite covers both meshes, the
# train step on one and sampling on the other.
@pytest.mark.parametrize("mesh_name", ["ep8", pytest.param("dp2xep4", marks=pytest.mark.slow)])
def test_dpo_step_expert_parallel_equals_single_device(mesh_name):
    """One DPO step with the experts split over the mesh equals the step without expert
    parallelism: every metric (loss, log-probs, rewards, aux_loss) and the update, to float32
    round-off."""
    (m_ref, u_ref), (m, u) = _dpo_step(None), _dpo_step(mesh_name)
    assert set(m) == set(m_ref) and "aux_loss" in m
    for k in m_ref:
        np.testing.assert_allclose(m[k], m_ref[k], rtol=1e-5, atol=1e-5, err_msg=k)
    scale = helpers.global_norm(u_ref)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * scale), u, u_ref)


@functools.cache
def _samples(mesh_name: str | None):
    """KV-cache samples (prefill of 3 right-padded prompts, then one token per step; 3 rows do
    not divide the mesh, so the exchange pads) of temperature 1 from one key, without expert
    parallelism (None) or under MESHES[mesh_name]."""
    ids, mask = helpers.padded_ids([6, 3, 5], low=3)
    lengths = mask.sum(1).astype(np.int32)
    cfg = sampling.SamplingConfig(max_new_tokens=5, temperature=1.0)
    params = _params(Model(_cfg()))
    shape, axis = MESHES[mesh_name] if mesh_name else ({"data": 8}, None)
    with jax.set_mesh(helpers.mesh(shape)):
        return jax.device_get(sampling.generate(Model(_cfg(moe_expert_axis=axis)), params, ids,
                                                lengths, jax.random.key(3), cfg))


@pytest.mark.parametrize("mesh_name", [pytest.param(m, marks=pytest.mark.slow) for m in ("ep8", "dp2xep4")])
def test_sampling_expert_parallel_equals_single_device(mesh_name):
    """Sampling under expert parallelism: the same tokens and log-probs as without it."""
    want, got = _samples(None), _samples(mesh_name)
    np.testing.assert_array_equal(got.tokens_BT, want.tokens_BT)
    np.testing.assert_allclose(got.logps_BT, want.logps_BT, rtol=1e-5, atol=1e-5)


def _run_config(axis: str, **overrides):
    """A 2-step tiny DPO run of a Mixtral-shaped model (8 experts unless overridden) on mesh
    2 x 4 x 1 with model.moe_expert_axis = axis."""
    c = runs.dpo_config(steps=2)
    c.model.preset = "tiny-llama"
    c.model.overrides.update({**dict(family="mixtral", n_experts=8, n_experts_per_tok=2,
                                     moe_d_ff=16, rope_scaling=None), **overrides})
    c.mesh.shape.update({"data": 2, "fsdp": 4, "tensor": 1})
    c.model.moe_expert_axis = axis
    return c


def test_run_refuses_an_expert_axis_that_does_not_divide_the_experts(tmp_path):
    """Before anything is written: 6 experts over fsdp = 4 is a ValueError naming the keys."""
    with pytest.raises(ValueError, match=r"moe_expert_axis='fsdp'.*6 experts.*4 devices"):
        runs.run(_run_config("fsdp", n_experts=6), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_dpo_run_with_expert_parallelism_equals_one_without(tmp_path, monkeypatch):
    """A 2-step DPO run (`model.moe_expert_axis='fsdp'` on mesh 2 x 4 x 1, the run's mesh set
    by workdir.opens_workdir) logs the same losses and log-probs as the same run without
    expert parallelism, and ends with the same parameters, to float32 round-off; the
    exchange is traced in the first run only."""
    traced = []
    exchange = moe_parallel.expert_parallel
    monkeypatch.setattr(moe_parallel, "expert_parallel",
                        lambda *a, **kw: traced.append(kw["axis"]) or exchange(*a, **kw))

    config = _run_config
    runs.run(config("fsdp"), tmp_path / "fsdp")
    n = len(traced)
    assert n and set(traced) == {"fsdp"}
    runs.run(config(""), tmp_path / "none")
    assert len(traced) == n
    want, got = (runs.records(tmp_path / d) for d in ("none", "fsdp"))
    assert len(want) == len(got) == 2
    for r, s in zip(got, want):
        for k in ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/margins",
                  "routing/agreement"):
            assert r[k] == pytest.approx(s[k], rel=1e-5, abs=1e-5), k
    c = config("fsdp")
    scale = helpers.global_norm(runs.final_params(config(""), tmp_path / "none"))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * scale),
                 runs.final_params(c, tmp_path / "fsdp"),
                 runs.final_params(config(""), tmp_path / "none"))
