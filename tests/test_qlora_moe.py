"""QLoRA over a mixture-of-experts base (``model.lora.base_quant``, dpo_jax/models/quant.py):
the experts quantised per (layer, expert) matrix and dequantised inside the expert matmuls of
every dispatch (dense, sparse tiled, sparse ``ragged_dot``, expert parallel). Each dispatch on
quantised experts equals the same dispatch on their dequantised float weights (output and
input gradient); its error against the float experts stays within the bound propagated from
the per-value quantisation bound; the model (Mixtral- and Qwen2-MoE-shaped, shared expert
included) equals the plain model on the dequantised tree with the router untouched; a QLoRA
DPO step on 8 fake devices, with and without expert parallelism, equals one device's."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import lora as lora_lib
from dpo_jax.models import Model, moe, moe_dispatch, moe_parallel, preset, quant
from tests import helpers

T, D, F, E = 29, 64, 32, 4


def _experts(kind: str, w: np.ndarray):
    """Float experts ``w`` [E, I, O] -> (``quant.Experts``, their dequantised float32 weights,
    the per-value bound on |dequantised - w| [E, I, O])."""
    leaves = jax.jit(lambda w: quant.quantize(kind, w, 1, 1), static_argnums=())(w)
    back = np.asarray(quant.dequantize(kind, leaves, w.shape, 1, 1))
    n, i, o = w.shape
    if kind == "int8":  # half a step of the output channel's scale
        bound = np.broadcast_to(np.asarray(leaves["scale"])[:, None, :] / 2, w.shape) * (
            1 + 1e-6) + 1e-9
    else:  # the block's half level gap + its double-quantised constant's half gap
        blocks = np.swapaxes(w, 1, 2).reshape(n, -1, quant.BLOCK)  # HF [out, in] order
        absmax = np.abs(blocks).max(-1)
        a2 = np.repeat(np.asarray(leaves["absmax2"]), quant.BLOCK2, axis=1)[:, :absmax.shape[1]]
        per_block = (absmax * np.diff(quant.NF4).max() / 2
                     + a2 * np.diff(quant.dynamic_map()).max() / 2 + 1e-7)
        bound = np.swapaxes(np.repeat(per_block, quant.BLOCK, axis=1).reshape(n, o, i), 1, 2)
    assert np.all(np.abs(back - w) <= bound)
    return quant.Experts(dict(leaves), kind, i, o), back, bound


def _silu(a):
    return a / (1 + np.exp(-a))


def _propagated_bound(x, index, weight, gate, up, down, bounds):
    """A rigorous bound on |y_quantised - y_float| per output [T, D] of the top-k gated MLP
    (float64): per copy, |dg| <= |x| B_gate and |du| <= |x| B_up; silu is 1.1-Lipschitz
    (max |silu'| = 1.0998), so |dh| <= (|silu(g)| + 1.1 |dg|) |du| + 1.1 |dg| |u|; then
    |dy| <= |dh| (|W_down| + B_down) + |h| B_down, summed with the router weights."""
    bg, bu, bd = (b.astype(np.float64) for b in bounds)
    out = np.zeros((x.shape[0], down.shape[-1]))
    ax = np.abs(x.astype(np.float64))
    for t in range(x.shape[0]):
        for k in range(index.shape[1]):
            e = index[t, k]
            g, u = x[t] @ gate[e].astype(np.float64), x[t] @ up[e].astype(np.float64)
            dg, du = ax[t] @ bg[e], ax[t] @ bu[e]
            dh = (np.abs(_silu(g)) + 1.1 * dg) * du + 1.1 * dg * np.abs(u)
            h = _silu(g) * u
            dy = dh @ (np.abs(down[e]) + bd[e]) + np.abs(h) @ bd[e]
            out[t] += abs(weight[t, k]) * dy
    return out


def _dense(x, index, weight, gate, up, down):
    """The dense dispatch (models/moe.py, moe_impl='dense') on [T, D] tokens."""
    cfg = preset("tiny-llama")
    comb = moe.combine_weights(weight[None], index[None], E)[0]
    y = moe._gated(cfg, x, gate, up, down, "td,edf->tef;tef,efd->ted")
    return jnp.einsum("ted,te->td", y, comb.astype(x.dtype))


DISPATCH = {
    "dense": _dense,
    "tiled": lambda *a: moe_dispatch.sparse_experts("silu", *a, kernel="tiled", tile=8),
    "ragged_dot": lambda *a: moe_dispatch.sparse_experts("silu", *a, kernel="ragged_dot"),
}
# relative Frobenius error of the output against the float experts (float32, weights normal
# std 0.1, x std 1; experiments/qlora/README.md), measured: NF4 0.156, int8 0.0097 (each of two
# chained quantised matmuls and the gate's product add to the error of one projection)
REL = {"nf4": (0.1, 0.22), "int8": (0.006, 0.014)}


@pytest.mark.parametrize("kind", ["nf4", pytest.param("int8", marks=pytest.mark.slow)])
def test_quantised_experts_equal_their_dequantised_weights_within_the_bound(kind):
    """29 tokens, 4 experts top-2 (skewed routing), D 64, F 32: every dispatch on quantised
    experts equals itself on the dequantised weights (output and d/dx, float32 round-off); the
    output error against the float experts is within the propagated per-value bound and its
    relative size in the measured range; the dispatches agree with each other."""
    rng = np.random.default_rng(0)
    x, index, weight, gate, up, down = helpers.routed_experts(rng, T, E, [0, 2], D=D, F=F)
    gate, up, down = (0.1 * w for w in (gate, up, down))
    (qg, g_back, bg), (qu, u_back, bu), (qd, d_back, bd) = (
        _experts(kind, w) for w in (gate, up, down))
    bound = _propagated_bound(x, index, weight, gate, up, down, (bg, bu, bd))
    cot = rng.normal(size=(T, D)).astype(np.float32)
    outs = {}
    for name, f in DISPATCH.items():
        run = jax.jit(lambda x, g, u, d, f=f: jax.value_and_grad(
            lambda x: jnp.sum(f(x, index, weight, g, u, d) * cot), has_aux=False)(x)[1])
        y_q = np.asarray(jax.jit(lambda x, g, u, d, f=f: f(x, index, weight, g, u, d))(
            x, qg, qu, qd))
        y_back = np.asarray(jax.jit(lambda x, g, u, d, f=f: f(x, index, weight, g, u, d))(
            x, g_back, u_back, d_back))
        y_float = np.asarray(jax.jit(lambda x, g, u, d, f=f: f(x, index, weight, g, u, d))(
            x, gate, up, down))
        np.testing.assert_allclose(y_q, y_back, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(run(x, qg, qu, qd), run(x, g_back, u_back, d_back),
                                   rtol=1e-4, atol=1e-5, err_msg=name)
        assert np.all(np.abs(y_q - y_float) <= bound * (1 + 1e-4) + 1e-5), name
        rel = np.linalg.norm(y_q - y_float) / np.linalg.norm(y_float)
        assert REL[kind][0] < rel < REL[kind][1], (name, rel)
        outs[name] = y_q
    np.testing.assert_allclose(outs["tiled"], outs["dense"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs["ragged_dot"], outs["dense"], rtol=1e-5, atol=1e-5)


def test_expert_parallel_dispatch_on_quantised_experts_equals_single_device():
    """expert_parallel over 8 fake devices (1 x 8 x 1, one expert each) and 2 x 2 x 2 (experts
    over tensor, ragged_dot) with NF4 experts equals sparse_experts on one device, and so does
    d/dx."""
    rng = np.random.default_rng(1)
    x, index, weight, gate, up, down = helpers.routed_experts(rng, T, 8, [0, 2, 4, 7], D=D, F=F)
    qg, qu, qd = (_experts("nf4", 0.1 * w)[0] for w in (gate, up, down))
    cot = rng.normal(size=(T, D)).astype(np.float32)
    for shape, axis, kernel in (((1, 8, 1), "fsdp", "tiled"), ((2, 2, 2), "tensor", "ragged_dot")):
        ref = lambda x, *w: moe_dispatch.sparse_experts("silu", x, index, weight, *w,
                                                         kernel=kernel, tile=8)
        vg = lambda f: jax.jit(jax.value_and_grad(lambda x, *w: jnp.sum(f(x, *w) * cot)))
        want, g_want = vg(ref)(x, qg, qu, qd)
        with jax.set_mesh(helpers.mesh(dict(zip(("data", "fsdp", "tensor"), shape)))):
            ep = lambda x, *w: moe_parallel.expert_parallel(
                "silu", x, index, weight, *w, mesh=moe_parallel.expert_mesh(axis), axis=axis,
                kernel=kernel, tile=8)
            got, g_got = vg(ep)(x, qg, qu, qd)
        assert float(got) == pytest.approx(float(want), rel=1e-5)
        np.testing.assert_allclose(g_got, g_want, rtol=1e-4, atol=1e-5)


SHAPES = {
    "mixtral": dict(family="mixtral", n_experts=4, n_experts_per_tok=2, moe_d_ff=32),
    "qwen2_moe": dict(family="qwen2_moe", n_experts=8, n_experts_per_tok=3, moe_d_ff=16,
                      moe_renormalize=False, shared_expert_d_ff=32, qkv_bias=True),
}


@pytest.mark.parametrize("shape,kind,impl", [
    pytest.param("mixtral", "nf4", "sparse", marks=pytest.mark.slow), ("qwen2_moe", "int8", "dense")])
def test_moe_model_is_the_model_of_the_dequantised_weights_router_float(shape, kind, impl):
    """Adapters on the attention projections: the logits over the quantised base equal the
    plain model's on the merged dequantised tree; the experts (and Qwen2-MoE's shared expert)
    are quantised, the router and the shared expert's gate are the float base's own arrays;
    LoRA does not target the experts (valid_targets)."""
    cfg = preset("tiny-llama", n_kv_head=2, rope_scaling=None, moe_impl=impl, **SHAPES[shape])
    model = lora_lib.LoraModel(cfg, lora_lib.LoraConfig(rank=4, base_quant=kind))
    assert not set(lora_lib.valid_targets(model)) & set(lora_lib.MLP)
    base = jax.tree.map(lambda x: x * 8 if x.ndim >= 3 else x, helpers.init_params(model))
    qbase = jax.jit(model.quantize_base)(base)
    mlp, qmlp = base["layers"]["mlp"], qbase["layers"]["mlp"]
    names = ("gate", "up", "down") + (("shared",) if "shared" in mlp else ())
    for name in names:
        leaves = qmlp[name] if name != "shared" else qmlp["shared"]["up"]
        assert set(leaves) == set(quant.LEAVES[kind]), name
    assert qmlp["gate"]["codes"].shape[:2] == (cfg.n_layer, cfg.n_experts)
    for name in ("router",) + (("shared_gate",) if "shared_gate" in mlp else ()):
        np.testing.assert_array_equal(qmlp[name], mlp[name])
        assert qmlp[name].dtype == mlp[name].dtype
    assert jax.tree.structure(model.abstract_base()) == jax.tree.structure(qbase)
    adapters = helpers.perturbed(jax.jit(model.init_adapters)(jax.random.key(1)), 0.05, 2)
    ids = np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 12)).astype(np.int32)
    pos = np.broadcast_to(np.arange(12, dtype=np.int32), ids.shape)
    seg = np.ones_like(ids)

    @jax.jit
    def all_logits(qbase, adapters):
        return (model.logits(lora_lib.join(qbase, adapters), ids, pos, seg),
                Model(cfg).logits(lora_lib.merge(model, qbase, adapters), ids, pos, seg),
                model.logits(qbase, ids, pos, seg),
                Model(cfg).logits(model.dequantize_base(qbase), ids, pos, seg))

    got, want, ref, ref_want = map(np.asarray, all_logits(qbase, adapters))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ref, ref_want, rtol=1e-5, atol=1e-5)
    back = model.dequantize_base(qbase)["layers"]["mlp"]
    for name in ("gate", "up", "down"):
        assert 0 < np.abs(np.asarray(back[name]) - np.asarray(mlp[name])).max()


def _moe_model(kind, axis=None):
    cfg = preset("tiny-llama", n_kv_head=2, rope_scaling=None, family="mixtral", n_experts=8,
                 n_experts_per_tok=2, moe_d_ff=16, moe_tile=16, moe_expert_axis=axis)
    return lora_lib.LoraModel(cfg, lora_lib.LoraConfig(rank=4, base_quant=kind))


@pytest.mark.parametrize("kind,mesh_shape,axis", [
    pytest.param("nf4", (2, 4, 1), "fsdp", marks=pytest.mark.slow),
    pytest.param("int8", (1, 8, 1), "fsdp", marks=pytest.mark.slow),
    pytest.param("nf4", (2, 2, 2), None, marks=pytest.mark.slow)])
def test_moe_qlora_step_on_eight_devices_equals_one(kind, mesh_shape, axis):
    """A QLoRA DPO step of a Mixtral-shaped model (8 experts top-2) on 8 fake devices, with the
    experts over fsdp (expert parallelism: 2 x 4 x 1, 1 x 8 x 1) or plain (2 x 2 x 2), equals
    the step on one device; the quantised experts' codes are sharded on the expert axis like
    the float experts."""
    one_model = _moe_model(kind)
    base = jax.tree.map(lambda x: x * 8 if x.ndim >= 3 else x, helpers.init_params(one_model))
    adapters = helpers.perturbed(jax.jit(one_model.init_adapters)(jax.random.key(0)), 0.05, 1)
    got = helpers.assert_qlora_step_on_mesh_equals_one_device(
        one_model, _moe_model(kind, axis), base, adapters,
        helpers.mesh(dict(zip(("data", "fsdp", "tensor"), mesh_shape))))
    codes = got[2].frozen.lora_base["layers"]["mlp"]["up"]["codes"]
    assert codes.dtype == (np.uint8 if kind == "nf4" else np.int8)
    assert codes.sharding.spec[1] == "fsdp"  # the expert axis, as the float experts'


def test_exported_quantization_config_keeps_the_router_float():
    """The PEFT directory's ``BitsAndBytesConfig`` of a mixture-of-experts base skips the
    routers and the shared expert's gate (float here) and nothing else: transformers' own
    module matcher on Mixtral's and Qwen2-MoE's module names."""
    utils = pytest.importorskip("transformers.quantizers.quantizers_utils")
    skip = quant.hf_quantization_config("nf4", "bfloat16", moe=True)["llm_int8_skip_modules"]
    for name in ("model.layers.0.block_sparse_moe.gate", "model.layers.3.mlp.gate",
                 "model.layers.3.mlp.shared_expert_gate", "lm_head"):
        assert not utils.should_convert_module(name, skip), name
    for name in ("model.layers.0.block_sparse_moe.experts.1.w1", "model.layers.0.mlp.gate_proj",
                 "model.layers.3.mlp.experts.0.gate_proj", "model.layers.0.self_attn.q_proj",
                 "model.layers.3.mlp.shared_expert.gate_proj"):
        assert utils.should_convert_module(name, skip), name
    assert quant.hf_quantization_config("int8", "float32")["llm_int8_skip_modules"] == ["lm_head"]
