"""Dropless sparse dispatch (models/moe_dispatch.py, `moe_impl='sparse'`, the default) against
the dense reference (`moe_impl='dense'`: every token through every expert, the unselected
outputs multiplied by 0): the grouped-matmul kernels against numpy, and the DPO train step's
metrics and update on padded, packed and prefix-shared batches of the real pipeline, on a
Mixtral-shaped and a Qwen2-MoE-shaped tiny model, equal to float32 round-off."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.logprobs import max_scored_tokens
from dpo_jax.models import Model, moe_dispatch
from dpo_jax.models.config import preset
from dpo_jax.step import make_train_step
from tests import helpers

# Mixtral: 4 experts top-2, renormalised; Qwen2-MoE: 8 experts top-3, not renormalised, shared
# expert. Weights of the experts and router scaled up so that routing is far from uniform.
SHAPES = {
    "mixtral": dict(family="mixtral", n_experts=4, n_experts_per_tok=2, moe_d_ff=32),
    "qwen2_moe": dict(family="qwen2_moe", n_experts=8, n_experts_per_tok=3, moe_d_ff=16,
                      moe_renormalize=False, shared_expert_d_ff=24, qkv_bias=True),
}


def _cfg(shape: str, **kw):
    return preset("tiny-llama", n_kv_head=2, rope_scaling=None, **SHAPES[shape], **kw)


def _params(model: Model, seed: int = 0):
    p = helpers.init_params(model, seed)
    return jax.tree.map(lambda x: x * 8 if x.ndim >= 3 else x, p)  # experts and router


def _group_rows(index_N, E):
    return [np.flatnonzero(index_N == e) for e in range(E)]


@pytest.mark.parametrize("kernel", moe_dispatch.KERNELS)
def test_kernels_match_numpy_per_token_and_their_gradients(kernel):
    """sparse_experts on 13 tokens, 5 experts top-2 (one expert unused, one holding most
    copies) equals the per-token sum over its own experts in float64 numpy; its gradients
    equal those of the dense formula (every expert, weight 0 off the top-k)."""
    rng = np.random.default_rng(0)
    T, D, F, E, K = 13, 6, 5, 5, 2
    x, index, weight, gate, up, down = helpers.routed_experts(rng, T, E, [0, 2, 4])
    silu = lambda a: a / (1 + np.exp(-a))
    want = np.zeros((T, D))
    for t in range(T):
        for k in range(K):
            e = index[t, k]
            h = silu(x[t] @ gate[e].astype(np.float64)) * (x[t] @ up[e].astype(np.float64))
            want[t] += weight[t, k] * (h @ down[e])
    f = lambda *a: moe_dispatch.sparse_experts("silu", a[0], index, a[1], *a[2:],
                                               kernel=kernel, tile=4)
    got = jax.jit(f)(x, weight, gate, up, down)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)

    def dense(x, weight, gate, up, down):
        comb = jnp.sum(jax.nn.one_hot(index, E) * weight[..., None], 1)  # [T, E]
        h = jax.nn.silu(jnp.einsum("td,edf->tef", x, gate)) * jnp.einsum("td,edf->tef", x, up)
        return jnp.einsum("tef,efd,te->td", h, down, comb)

    cot = rng.normal(size=(T, D)).astype(np.float32)
    loss = lambda fn: jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) * cot), argnums=range(5)))
    for g, g_ref in zip(loss(f)(x, weight, gate, up, down),
                        loss(dense)(x, weight, gate, up, down)):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-4)


def test_tiled_layout_bounds_and_skipped_tiles():
    """Tile rows shrink for few copies (sampling), and the tiled kernel skips tail tiles
    (expert -1) with zero output and zero gradient."""
    assert moe_dispatch.tile_rows(4096 * 2, 8, 128) == 128
    assert moe_dispatch.tile_rows(8 * 2, 8, 128) == 8
    assert moe_dispatch.tile_rows(100, 4, 128) == 32
    x = jnp.ones((3, 4, 2))
    w = jnp.arange(2 * 2 * 3, dtype=jnp.float32).reshape(2, 2, 3)
    expert = jnp.array([1, 0, -1])
    y = moe_dispatch.tiled_matmul(x, w, expert)
    np.testing.assert_array_equal(y[0], np.ones((4, 2)) @ np.asarray(w[1]))
    np.testing.assert_array_equal(y[2], 0)
    dx, dw = jax.grad(lambda x, w: jnp.sum(moe_dispatch.tiled_matmul(x, w, expert)),
                      (0, 1))(x, w)
    np.testing.assert_array_equal(dx[2], 0)
    np.testing.assert_array_equal(dw, np.full((2, 2, 3), 4.0))  # one tile of 4 ones each


LAYOUTS = {
    "padded": dict(buckets="48"),
    "packed": dict(packing=True, pack_length=96, buckets="96", row_multiple=8),
    "prefix_shared": dict(prefix_sharing=True),
}
CASES = [("mixtral", "padded"), ("qwen2_moe", "packed"), ("mixtral", "prefix_shared")]


def _rel_close(a, b, rtol):
    """Every leaf of tree a within rtol * (global norm of b) of tree b."""
    scale = helpers.global_norm(b)
    assert scale > 1e-6
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=rtol * scale), a, b)


# Mixtral's sparse step is checked whole by test_dpo_step_sparse_equals_dense below.
@pytest.mark.parametrize("shape,layout", helpers.fast_cases(CASES, {("qwen2_moe", "packed")}))
def test_sequence_logps_router_loss_and_vjp_sparse_equal_dense(shape, layout):
    """The step's per-sequence statistics (summed log-probs, scored counts, router loss) and
    their vector-Jacobian product with a random cotangent: sparse equals dense to float32
    round-off on the real pipeline's padded, packed and prefix-shared batches. Every loss is a
    function of these (losses.SequenceStats + the aux term), so equal values and VJPs give equal
    losses and gradients (the full step is checked below on one layout)."""
    from dpo_jax.step import sequence_stats

    batch = helpers.pair_batch(helpers.synthetic_pairs(8), **LAYOUTS[layout])
    if layout == "packed":
        assert batch["segment_ids"].max() >= 2
    max_scored = max_scored_tokens(batch["loss_mask"])
    params = _params(Model(_cfg(shape, moe_impl="dense")))
    cot = np.random.default_rng(2).normal(size=16).astype(np.float32)
    out = {}
    for impl in ("dense", "sparse"):
        model = Model(_cfg(shape, moe_impl=impl, moe_tile=16))

        def f(p, model=model):
            st = sequence_stats(model, p, batch, helpers.step_config(), max_scored,
                                router_aux=True)
            return jnp.sum(st.logps * cot) + st.router_aux, (st.logps, st.lengths, st.router_aux)

        out[impl] = jax.device_get(jax.jit(jax.value_and_grad(f, has_aux=True))(params))
    ((v_d, (l_d, n_d, a_d)), g_d), ((v_s, (l_s, n_s, a_s)), g_s) = out["dense"], out["sparse"]
    np.testing.assert_array_equal(n_s, n_d)
    np.testing.assert_allclose(l_s, l_d, rtol=1e-5, atol=1e-4)
    assert float(a_s) == pytest.approx(float(a_d), rel=1e-6)
    assert abs(float(v_s) - float(v_d)) <= 1e-6 * float(np.sum(np.abs(l_d * cot)))
    _rel_close(g_s, g_d, 1e-5)


def test_dpo_step_sparse_equals_dense():
    """One DPO step (sigmoid, router loss 0.1; SGD lr 1, so the update is the gradient) on the
    8-device data mesh with moe_impl sparse and dense from the same parameters: every metric
    (loss, log-probs, rewards, aux_loss) and the update equal to float32 round-off."""
    batch_np = helpers.pair_batch(helpers.synthetic_pairs(8), **LAYOUTS["padded"])
    params = _params(Model(_cfg("mixtral", moe_impl="dense")))
    tx, schedule = helpers.optimizer()
    batch, max_scored = helpers.device_batch(batch_np)
    out = {}
    for impl in ("dense", "sparse"):
        model = Model(_cfg("mixtral", moe_impl=impl, moe_tile=16))
        state = helpers.train_state(model, params, tx, ref_params=helpers.perturbed(params, 0.05))
        step = jax.jit(make_train_step(model, helpers.loss_config(router_aux_loss_coef=0.1),
                                       tx, schedule, helpers.step_config()), static_argnums=2)
        new_state, metrics = step(state, batch, max_scored)
        out[impl] = (jax.device_get(metrics), jax.device_get(new_state.trainable))
    (m_d, p_d), (m_s, p_s) = out["dense"], out["sparse"]
    assert set(m_d) == set(m_s) and "aux_loss" in m_d
    for k in m_d:
        np.testing.assert_allclose(m_s[k], m_d[k], rtol=1e-5, atol=1e-5, err_msg=k)
    update = lambda p: jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b, p, params)
    _rel_close(update(p_s), update(p_d), 1e-5)


@pytest.mark.slow  # the suite's 8-minute budget: a sibling test covers the kind
def test_remat_unrolled_and_sampling_match_dense():
    """The sparse forward and gradient under remat (dots_saveable) in the layer scan and
    unrolled layers equal the dense ones; so do prefill + one-token decode logits (the sampler's
    path, where few tokens use the small tiles)."""
    ids, mask = helpers.padded_ids([12, 7, 9], low=3)
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    params = _params(Model(_cfg("mixtral", moe_impl="dense")))
    cot = np.random.default_rng(1).normal(size=(*ids.shape, 128)).astype(np.float32)

    def value_and_grad(**kw):
        model = Model(_cfg("mixtral", **kw))
        return jax.jit(jax.value_and_grad(
            lambda p: jnp.sum(model.logits(p, ids, pos, mask) * cot * mask[..., None])))(params)

    v_ref, g_ref = value_and_grad(moe_impl="dense")
    for kw in (dict(remat="dots_saveable"), dict(scan_layers=False)):
        v, g = value_and_grad(**kw)
        assert float(v) == pytest.approx(float(v_ref), rel=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(
            a, b, atol=1e-5 * float(np.max(np.abs(b)) + 1)), g, g_ref)

    def sample_logits(impl):
        model = Model(_cfg("mixtral", moe_impl=impl))
        cache = model.init_cache(3, 16)
        _, cache = model.decode(params, ids[:, :7], pos[:, :7], cache, mask[:, :7])
        h, _ = model.decode(params, ids[:, 7:8], pos[:, 7:8], cache)
        return np.asarray(h)

    np.testing.assert_allclose(sample_logits("sparse"), sample_logits("dense"), atol=2e-5)
