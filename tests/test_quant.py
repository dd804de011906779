"""The quantised frozen base (dpo_jax/models/quant.py, QLoRA): NF4 levels against the paper's
table and their normal-quantile construction, NF4 with double quantisation and int8 row-wise
against bitsandbytes' own output (tests/fixtures/quant/make_bnb_fixture.py), round-trip error
bounds derived from the level spacing, each projection's output error against the float weight,
and the quantised model (every tiny family, adapters on) against the plain model on the
dequantised weights, forward and adapter gradients."""

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import lora as lora_lib
from dpo_jax.config import base_config
from dpo_jax.models import Model, preset, quant
from tests import helpers

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "quant" / "bnb_nf4_int8.npz"

# QLoRA (Dettmers et al. 2023), Appendix E: the NF4 data type's 16 values, as printed.
PAPER_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
             -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
             0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
             0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
             0.7229568362236023, 1.0]


def bnb_weights():
    """The fixture's seeded weights in HF's [out, in] layout (make_bnb_fixture.weights)."""
    rng = np.random.default_rng(0)
    w4 = (rng.standard_normal((150, 128)) * 0.02).astype(np.float32)
    w4[3, :64] *= 40.0
    w8 = (rng.standard_normal((24, 40)) * 0.05).astype(np.float16)
    return w4, w8


# ----------------------------------------------------------------------------- the data types
def test_nf4_levels_are_the_papers_table_and_its_normal_quantiles():
    np.testing.assert_array_equal(quant.NF4, np.float32(PAPER_NF4))
    np.testing.assert_array_equal(quant.NF4, np.load(FIXTURE)["nf4_code"])
    # the construction (paper Sec. 3, bitsandbytes' create_normal_map(0.9677083)): 8 positive
    # and 7 negative normal quantiles of an asymmetric split, plus an exact zero, scaled to
    # [-1, 1]
    norm = pytest.importorskip("scipy.stats").norm
    offset = 0.9677083
    pos = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    v = np.sort(np.concatenate([pos, [0.0], neg]))
    np.testing.assert_allclose(quant.NF4, v / np.abs(v).max(), atol=1e-7)


def test_dynamic_map_is_bitsandbytes_to_two_ulp():
    ours, theirs = quant.dynamic_map(), np.load(FIXTURE)["dynamic_map"]
    assert ours.shape == (256,) and np.all(np.diff(ours) >= 0)
    # torch.linspace rounds differently from numpy's in the last bits of a few means
    np.testing.assert_array_max_ulp(ours, theirs, maxulp=2)


def test_nf4_with_double_quantisation_is_bitsandbytes():
    f = np.load(FIXTURE)
    w4, _ = bnb_weights()
    leaf = jax.device_get(jax.jit(quant.quantize, static_argnums=(0, 2, 3))(
        "nf4", jnp.asarray(w4.T), 0, 1))  # ours is [in, out]
    np.testing.assert_array_equal(leaf["codes"].reshape(-1), f["codes"])  # 4-bit codes, packed
    np.testing.assert_allclose(leaf["offset"], f["offset"], rtol=1e-6)
    np.testing.assert_allclose(leaf["absmax2"], f["absmax2"], rtol=1e-6)
    # the block constants' 8-bit codes: ours are the nearest level (bitsandbytes' torch
    # kernel); its CPU C kernel's approximate search picks the other neighbour in a few
    # near-ties, which are checked to be no nearer
    ours, theirs = leaf["absmax"].reshape(-1), f["absmax"]
    _, absmax = quant.quantize_blockwise(jnp.asarray(w4.reshape(-1)), quant.NF4, 64)
    x = (np.asarray(absmax) - f["offset"]) / np.repeat(f["absmax2"], 256)[:300]
    dm = quant.dynamic_map()
    differ = ours != theirs
    assert differ.mean() < 0.05 and np.all(np.abs(ours[differ].astype(int) - theirs[differ]) == 1)
    assert np.all(np.abs(x - dm[ours]) <= np.abs(x - dm[theirs]))
    # dequantising bitsandbytes' own codes gives bitsandbytes' weights
    theirs_leaf = {"codes": f["codes"].reshape(leaf["codes"].shape), "absmax2": f["absmax2"],
                   "absmax": theirs.reshape(leaf["absmax"].shape), "offset": f["offset"]}
    w = jax.jit(quant.dequantize, static_argnums=(0, 2, 3, 4))("nf4", theirs_leaf, (128, 150),
                                                              0, 1)
    np.testing.assert_allclose(np.asarray(w).T, f["dequantized"], rtol=1e-6, atol=1e-9)


def test_int8_is_bitsandbytes_row_wise():
    f = np.load(FIXTURE)
    _, w8 = bnb_weights()
    leaf = jax.device_get(quant.quantize("int8", jnp.asarray(w8.T), 0, 1))
    np.testing.assert_array_equal(leaf["codes"].T, f["int8_codes"])
    np.testing.assert_allclose(leaf["scale"] * 127, f["int8_absmax"], rtol=2e-7)


# ----------------------------------------------------------------------------- error bounds
def _heavy_tailed(shape, seed):
    rng = np.random.default_rng(seed)
    return (0.02 * rng.standard_t(3, shape)).astype(np.float32)


@pytest.mark.parametrize("shape,n_in", [((3, 64, 96), 1), ((2, 4, 8, 32), 2)])
def test_round_trip_errors_are_within_the_level_spacing(shape, n_in):
    """NF4: |w - w'| <= absmax_b * (largest half gap between NF4 levels) + the block
    constant's own error (<= its block's absmax2 * the largest half gap of the dynamic map);
    int8: |w - w'| <= scale / 2 (+ float32 round-off)."""
    w = jnp.asarray(_heavy_tailed(shape, 0))
    round_trip = jax.jit(lambda kind, w: (lambda lf: (lf, quant.dequantize(
        kind, lf, shape, 1, n_in)))(quant.quantize(kind, w, 1, n_in)), static_argnums=0)
    leaf, back = round_trip("nf4", w)
    back = np.asarray(back)
    err = np.abs(np.asarray(w) - back)
    L, i, o = shape[0], int(np.prod(shape[1:1 + n_in])), int(np.prod(shape[1 + n_in:]))
    blocks = lambda a: np.swapaxes(a.reshape(L, i, o), 1, 2).reshape(L, -1, 64)  # HF order
    absmax = np.abs(blocks(np.asarray(w))).max(-1)  # [L, blocks]
    half_gap4 = np.diff(quant.NF4).max() / 2
    half_gap8 = np.diff(quant.dynamic_map()).max() / 2
    a2 = np.repeat(np.asarray(leaf["absmax2"]), 256, axis=1)[:, :absmax.shape[1]]
    bound = absmax * half_gap4 + a2 * half_gap8 + 1e-7  # per block
    assert np.all(blocks(err) <= bound[..., None])
    assert 0.01 < np.linalg.norm(err) / np.linalg.norm(np.asarray(w)) < 0.2
    leaf8, back8 = round_trip("int8", w)
    back8 = np.asarray(back8)
    scale = np.asarray(leaf8["scale"]).reshape((shape[0],) + (1,) * n_in + shape[1 + n_in:])
    assert np.all(np.abs(np.asarray(w) - back8) <= scale / 2 * (1 + 1e-6) + 1e-9)


def test_each_projection_output_error_against_the_float_weight():
    """Relative Frobenius error of ``x @ W`` per projection of a tiny Llama with normal
    weights (std 0.02), quantised against float, float32 inputs: NF4 under 0.12, int8 under
    0.012 (measured: 0.092-0.094 and 0.0063-0.0071; experiments/qlora/README.md)."""
    cfg = preset("tiny-llama", d_model=128, d_ff=256, n_head=4, head_dim=32, n_kv_head=2)
    params = Model(cfg).init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (64, 256))
    projections = quant.projections(cfg, params)

    @functools.partial(jax.jit, static_argnums=0)
    def errors(kind):
        out = {}
        for name, (path, n_in) in projections.items():
            w = params
            for k in path:
                w = w[k]
            w0 = w[0]
            i = int(np.prod(w0.shape[:n_in]))
            leaf = jax.tree.map(lambda a: a[0], quant.quantize(kind, w, 1, n_in))
            y = quant._matmul(kind, w0.shape[:n_in], w0.shape[n_in:], x[:, :i], leaf)
            want = x[:, :i] @ w0.reshape(i, -1)
            out[name] = jnp.linalg.norm(y - want) / jnp.linalg.norm(want)
        return out

    for kind, tol in (("nf4", 0.12), ("int8", 0.012)):
        for name, rel in jax.device_get(errors(kind)).items():
            assert 0.2 * tol < rel < tol, (kind, name, rel)


# ----------------------------------------------------------------------------- the model
MOE = {"n_experts": 4, "n_experts_per_tok": 2, "moe_d_ff": 32}
slow = pytest.mark.slow  # the decoder code is shared; these add families, not code paths
FAMILIES = [("nf4", "tiny-gpt2", {}), ("int8", "tiny-llama", {}), ("nf4", "tiny-llama", MOE),
            pytest.param("nf4", "tiny-neox", {}, marks=slow),
            pytest.param("nf4", "tiny-gptj", {}, marks=slow),
            pytest.param("nf4", "tiny-llama", {}, marks=slow),
            pytest.param("nf4", "tiny-gemma", {}, marks=slow),
            pytest.param("int8", "tiny-gpt2", {}, marks=slow),
            pytest.param("int8", "tiny-gemma", {}, marks=slow)]


@pytest.mark.parametrize("kind,name,over", FAMILIES)
def test_quantised_model_is_the_model_of_the_dequantised_weights(kind, name, over):
    """Adapters on, every family: logits over the quantised base equal the plain model on the
    merged dequantised weights; the adapters off, the quantised base alone (the reference)."""
    cfg = preset(name, **over)
    model = lora_lib.LoraModel(cfg, lora_lib.LoraConfig(rank=4, base_quant=kind))
    base = helpers.init_params(model)
    qbase = jax.jit(model.quantize_base)(base)
    adapters = helpers.perturbed(jax.jit(model.init_adapters)(jax.random.key(1)), 0.05, 2)
    ids = np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 12)).astype(np.int32)
    pos = np.broadcast_to(np.arange(12, dtype=np.int32), ids.shape)
    seg = np.ones_like(ids)
    merged = Model(lora_lib.merged_config(model))

    @jax.jit
    def all_logits(base, qbase, adapters):
        return (model.logits(lora_lib.join(qbase, adapters), ids, pos, seg),
                merged.logits(lora_lib.merge(model, qbase, adapters), ids, pos, seg),
                model.logits(qbase, ids, pos, seg),  # the reference: adapters off
                Model(cfg).logits(model.dequantize_base(qbase), ids, pos, seg),
                Model(cfg).logits(base, ids, pos, seg))

    got, want, ref, ref_want, float_ref = map(np.asarray, all_logits(base, qbase, adapters))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ref, ref_want, rtol=1e-5, atol=1e-5)
    assert np.abs(ref - float_ref).max() > 1e-5  # it is quantised
    assert np.abs(got - ref).max() > 1e-4  # the adapters act


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_quantised_embedding_rows_are_the_dequantised_table(kind):
    """``quant_embedding``: an untied embedding (tiny NeoX, d_model 64) is held quantised and
    only the looked-up rows are dequantised: the logits equal the plain model's on the
    dequantised tree; each row within its blocks' level spacing; a tied table stays float."""
    cfg = preset("tiny-neox")
    model = lora_lib.LoraModel(cfg, lora_lib.LoraConfig(rank=4, base_quant=kind,
                                                        quant_embedding=True))
    base = helpers.init_params(model)
    ids = np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 12)).astype(np.int32)
    pos = np.broadcast_to(np.arange(12, dtype=np.int32), ids.shape)

    @jax.jit
    def run(base):
        q = model.quantize_base(base)
        back = model.dequantize_base(q)
        return (q["embed"], back["embed"], model.logits(q, ids, pos, np.ones_like(ids)),
                Model(cfg).logits(back, ids, pos, np.ones_like(ids)))

    table, back, got, want = jax.device_get(run(base))
    assert set(table) == ({"codes", "scale"} if kind == "int8" else
                          {"codes", "absmax", "absmax2", "offset"})
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    w = np.asarray(base["embed"])
    absmax = np.abs(w).max(1, keepdims=True)
    step = absmax / 127 / 2 if kind == "int8" else (  # + the block constant's own error
        absmax * np.diff(quant.NF4).max() / 2
        + table["absmax2"].max() * np.diff(quant.dynamic_map()).max() / 2)
    assert np.all(np.abs(back - w) <= step + 1e-7)
    tied = lora_lib.LoraModel(preset("tiny-gpt2"), lora_lib.LoraConfig(
        rank=4, base_quant=kind, quant_embedding=True))
    assert not isinstance(tied.abstract_base()["embed"], dict)  # the head reads it whole


def test_adapter_gradients_equal_those_on_the_dequantised_base():
    """d(sum of log-probs)/d(adapters) with the in-matmul dequantisation (checkpointed,
    recomputed in the backward) equals the gradient on the dequantised base held in float."""
    cfg = preset("tiny-llama")
    q = lora_lib.LoraModel(cfg, lora_lib.LoraConfig(rank=4, base_quant="nf4"))
    plain = lora_lib.LoraModel(cfg, lora_lib.LoraConfig(rank=4))
    qbase = jax.jit(q.quantize_base)(helpers.init_params(q))
    fbase = q.dequantize_base(qbase)
    adapters = helpers.perturbed(jax.jit(q.init_adapters)(jax.random.key(1)), 0.05, 2)
    ids = np.random.default_rng(0).integers(1, cfg.vocab_size, (2, 12)).astype(np.int32)
    pos = np.broadcast_to(np.arange(12, dtype=np.int32), ids.shape)

    def loss(model, base):
        def f(a):
            logits = model.logits(lora_lib.join(base, a), ids, pos, np.ones_like(ids))
            return jnp.sum(jax.nn.log_softmax(logits)[:, :-1].max(-1))
        return jax.jit(jax.grad(f))(adapters)

    got, want = loss(q, qbase), loss(plain, fbase)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6)
    assert helpers.global_norm(got) > 0


def test_bad_settings_are_refused():
    cfg = preset("tiny-gpt2")
    with pytest.raises(ValueError, match="base_quant='fp4'.*expected one of"):
        lora_lib.read_lora(_block(rank=4, base_quant="fp4"))
    with pytest.raises(ValueError, match="needs model.lora.rank > 0"):
        lora_lib.read_lora(_block(rank=0, base_quant="nf4"))
    with pytest.raises(ValueError, match="quant_embedding=True .* which is 'none'"):
        lora_lib.read_lora(_block(rank=4, quant_embedding=True))
    odd = dataclasses.replace(cfg, d_model=36, n_head=4, head_dim=9)
    with pytest.raises(ValueError, match="not a multiple of the NF4 block"):
        lora_lib.LoraModel(odd, lora_lib.LoraConfig(rank=2, base_quant="nf4")).abstract_base()


def _block(**kw):
    block = base_config().model.lora
    block.update(**kw)
    return block
