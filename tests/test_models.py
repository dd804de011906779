"""Model-level properties that need no transformers: shapes, axes, causality, segments, scan,
KV-cache decoding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax.models import Model, flops_per_token, param_count, preset, PRESETS

TINY = ["tiny-gpt2", "tiny-neox", "tiny-gptj", "tiny-llama", "tiny-gemma"]


def _inputs(B=2, L=12, V=128, seed=0):
    ids = jax.random.randint(jax.random.key(seed), (B, L), 0, V)
    pos = jnp.broadcast_to(jnp.arange(L), (B, L)).astype(jnp.int32)
    seg = jnp.ones((B, L), jnp.int32)
    return ids, pos, seg


def random_params(model, seed=0, std=0.1):
    """Random params from numpy (fast; model.init's compile is tested once separately).
    Non-zero biases and non-unit norm scales so every parameter matters."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(0, std, s.shape) + (
        1.0 if s.ndim <= 2 and s.shape[-1] == model.cfg.d_model else 0.0), s.dtype),
        model.abstract_params())


def test_init_matches_abstract_and_count():
    model = Model(preset("tiny-llama"))
    params = jax.jit(model.init)(jax.random.key(0))
    assert jax.tree.map(lambda x: (x.shape, x.dtype), model.abstract_params()) == jax.tree.map(
        lambda x: (x.shape, x.dtype), params)
    assert sum(x.size for x in jax.tree.leaves(params)) == param_count(model.cfg)


@pytest.fixture(scope="module", params=TINY)
def built(request):
    cfg = preset(request.param)
    model = Model(cfg)
    params = random_params(model)
    model.hidden = jax.jit(model.hidden)  # one compile per shape instead of eager dispatch
    return cfg, model, params


@pytest.fixture(scope="module")
def hidden(built):
    """``((ids, pos, seg), h)``: :func:`_inputs` and ``built``'s hidden states on them."""
    _, model, params = built
    ids, pos, seg = _inputs()
    return (ids, pos, seg), model.hidden(params, ids, pos, seg)


def test_tree_axes_count(built):
    cfg, model, params = built
    axes = model.logical_axes()
    is_t = lambda x: isinstance(x, tuple)
    assert jax.tree.structure(axes, is_leaf=is_t) == jax.tree.structure(params)
    for a, p in zip(jax.tree.leaves(axes, is_leaf=is_t), jax.tree.leaves(params)):
        assert len(a) == p.ndim
        assert set(a) <= {None, "vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers"}
    abstract = model.abstract_params()
    assert jax.tree.map(lambda x: (x.shape, x.dtype), abstract) == jax.tree.map(
        lambda x: (x.shape, x.dtype), params)
    assert sum(x.size for x in jax.tree.leaves(params)) == param_count(cfg)


def test_scan_equals_unrolled(built, hidden):
    cfg, _, params = built
    (ids, pos, seg), ref = hidden
    other = Model(dataclasses.replace(cfg, scan_layers=False))
    got = jax.jit(other.hidden)(params, ids, pos, seg)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_remat_gradients_match(built):
    cfg, model, params = built
    ids, pos, seg = _inputs(L=8)

    def grad_fn(m):
        return jax.jit(jax.grad(lambda p: jnp.sum(jnp.square(m.hidden(p, ids, pos, seg)))))

    if cfg.family in ("gptj", "gemma3"):
        pytest.skip("remat is family-independent; three families keep the suite fast")
    # llama (GQA) also with dots_no_batch in the layer scan: configs/hh.py's setting for
    # SmolLM2 (the attention's batched score / value contractions are recomputed)
    kws = {"llama": [dict(remat="full", scan_layers=False), dict(remat="dots_no_batch")],
           "gpt2": [dict(remat="dots_saveable")], "neox": [dict(remat="dots_no_batch")]}
    ref = grad_fn(model)(params)
    for kw in kws[cfg.family]:
        got = grad_fn(Model(dataclasses.replace(cfg, **kw)))(params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got,
                     ref)


def test_causal(built, hidden):
    _, model, params = built
    (ids, pos, seg), h1 = hidden
    h2 = model.hidden(params, ids.at[:, 7].set((ids[:, 7] + 1) % 128), pos, seg)
    np.testing.assert_array_equal(h1[:, :7], h2[:, :7])
    assert not np.allclose(h1[:, 7:], h2[:, 7:])


def test_segments_isolated(built):
    cfg, model, params = built
    ids, _, _ = _inputs(B=1, L=12)
    a, b = ids[:, :5], ids[:, 5:10]
    packed = jnp.concatenate([a, b, jnp.zeros((1, 2), ids.dtype)], axis=1)
    pos = jnp.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 0]], jnp.int32)
    seg = jnp.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0]], jnp.int32)
    h = model.hidden(params, packed, pos, seg)
    assert np.all(np.isfinite(h))
    ones = jnp.ones((1, 5), jnp.int32)
    ar = jnp.arange(5)[None]
    np.testing.assert_allclose(h[:, :5], model.hidden(params, a, ar, ones), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h[:, 5:10], model.hidden(params, b, ar, ones), rtol=1e-5,
                               atol=1e-5)


def test_sliding_window_limits_the_receptive_field():
    """Two sliding layers of window 4: token 0 reaches positions 0..6 (3 + 3 steps back) and
    nothing after; one full layer instead lets it reach every later position."""
    ids, pos, seg = _inputs(B=1, L=12)
    changed = ids.at[:, 0].set((ids[:, 0] + 1) % 128)
    for types, reach in ((("sliding", "sliding"), 7), (("sliding", "full"), 12)):
        model = Model(preset("tiny-gemma", layer_types=types))
        params = random_params(model)
        h1, h2 = (jax.jit(model.hidden)(params, x, pos, seg) for x in (ids, changed))
        assert not np.allclose(h1[:, reach - 1], h2[:, reach - 1])
        np.testing.assert_array_equal(h1[:, reach:], h2[:, reach:])


@pytest.mark.parametrize("scan", [True, False])
def test_kv_cache_decode_matches_forward(built, scan):
    cfg, model, params = built
    if not scan:
        if cfg.family != "llama":
            pytest.skip("unrolled decode checked on one family")
        model = Model(dataclasses.replace(cfg, scan_layers=False))
        model.hidden = jax.jit(model.hidden)
    lens = [6, 3, 5]
    P, steps = max(lens), 4
    B = len(lens)
    toks = np.asarray(jax.random.randint(jax.random.key(5), (B, P + steps), 0, 128))
    prompt = np.zeros((B, P), np.int32)
    pseg = np.zeros((B, P), np.int32)
    for b, n in enumerate(lens):
        prompt[b, :n] = toks[b, :n]
        pseg[b, :n] = 1
    ppos = np.broadcast_to(np.arange(P), (B, P)).astype(np.int32)
    cache = model.init_cache(B, P + steps + 2)
    decode = jax.jit(model.decode)
    h_pre, cache = decode(params, prompt, ppos, cache, pseg)
    np.testing.assert_array_equal(cache["index"], lens)
    got = [[h_pre[b, :n] for b, n in enumerate(lens)]]
    for t in range(steps):
        nxt = np.array([toks[b, n + t] for b, n in enumerate(lens)], np.int32)[:, None]
        pos = np.array([n + t for n in lens], np.int32)[:, None]
        h, cache = decode(params, nxt, pos, cache)
        got.append([h[b] for b in range(B)])
    # Full forward on the right-padded batch of whole sequences (one compile).
    W = P + steps
    seq, seg = np.zeros((B, W), np.int32), np.zeros((B, W), np.int32)
    for b, n in enumerate(lens):
        seq[b, :n + steps], seg[b, :n + steps] = toks[b, :n + steps], 1
    h_full = model.hidden(params, seq, np.broadcast_to(np.arange(W), (B, W)), seg)
    for b, n in enumerate(lens):
        full = h_full[b, :n + steps]
        mine = np.concatenate([got[0][b]] + [g[b] for g in got[1:]], axis=0)
        np.testing.assert_allclose(mine, full, rtol=1e-4, atol=1e-4)


def test_chunked_attention_equals_dense_any_mask():
    """Query-blocked attention (T not a multiple of the block: padded rows) against the dense
    XLA path on an arbitrary mask (decode-style: not causal), GQA, values and gradients; also
    with soft-capped scores."""
    from dpo_jax.models.layers import chunked_attention, softcapped_attention

    B, T, S, N, K, Dh = 2, 11, 9, 4, 2, 8
    kq, kk, kv, km = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(kq, (B, T, N, Dh))
    k = jax.random.normal(kk, (B, S, K, Dh))
    v = jax.random.normal(kv, (B, S, K, Dh))
    mask = jax.random.bernoulli(km, 0.6, (B, 1, T, S)).at[..., 0].set(True)

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))

    dense = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask)
    chunked = lambda q, k, v: chunked_attention(q, k, v, mask, 4)
    np.testing.assert_allclose(jax.jit(chunked)(q, k, v), dense(q, k, v), rtol=1e-5, atol=1e-6)
    g_ref = jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v)
    g = jax.jit(jax.grad(loss(chunked), argnums=(0, 1, 2)))(q, k, v)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g, g_ref)
    # Soft-capped scores (Gemma 2) with another scale: the explicit formula, dense and chunked.
    scale, cap = 0.3, 2.0
    s = jnp.einsum("btkgd,bskd->bkgts", q.reshape(B, T, K, N // K, Dh), k) * scale
    p = jax.nn.softmax(jnp.where(mask[:, :, None], cap * jnp.tanh(s / cap), -jnp.inf), -1)
    want = jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(B, T, N, Dh)
    capped = lambda q, k, v: softcapped_attention(q, k, v, mask, scale, cap)
    chunked = lambda q, k, v: chunked_attention(q, k, v, mask, 4, scale, cap)
    np.testing.assert_allclose(capped(q, k, v), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jax.jit(chunked)(q, k, v), want, rtol=1e-5, atol=1e-6)
    g_ref = jax.grad(loss(capped), argnums=(0, 1, 2))(q, k, v)
    g = jax.jit(jax.grad(loss(chunked), argnums=(0, 1, 2)))(q, k, v)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g, g_ref)


@pytest.mark.parametrize("name", [pytest.param("tiny-gpt2", marks=pytest.mark.slow), "tiny-llama"])
def test_chunked_attention_model_matches_dense(name):
    """attention_impl='chunked' through the whole model: packed segments + padding, hidden
    states and parameter gradients equal the dense path's; block 5 does not divide 13."""
    model = Model(preset(name))
    params = random_params(model)
    chunked = Model(preset(name, attention_impl="chunked", attention_chunk=5))
    ids, _, _ = _inputs(B=2, L=13)
    pos = jnp.array([list(range(6)) + list(range(5)) + [0, 0], list(range(13))], jnp.int32)
    seg = jnp.array([[1] * 6 + [2] * 5 + [0, 0], [1] * 13], jnp.int32)

    def grad_fn(m):
        f = lambda p: jnp.sum(jnp.square(m.hidden(p, ids, pos, seg)))
        return jax.jit(jax.value_and_grad(f))

    np.testing.assert_allclose(jax.jit(chunked.hidden)(params, ids, pos, seg),
                               jax.jit(model.hidden)(params, ids, pos, seg), rtol=1e-5, atol=1e-5)
    (v_ref, g_ref), (v, g) = grad_fn(model)(params), grad_fn(chunked)(params)
    np.testing.assert_allclose(v, v_ref, rtol=1e-5)
    # float32 summation order only: error relative to each gradient's scale
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b)) + 1)), g, g_ref)


def test_bf16_compute_runs():
    cfg = preset("tiny-llama", dtype="bfloat16", param_dtype="bfloat16")
    model = Model(cfg)
    params = random_params(model)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    ids, pos, seg = _inputs()
    logits = jax.jit(model.logits)(params, ids, pos, seg)
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
    assert jax.eval_shape(model.hidden, params, ids, pos, seg).dtype == jnp.bfloat16


def test_presets_counts_and_flops():
    # Public totals (tied heads counted once): a sanity check of the preset shapes.
    expected = {"gpt2": 124_439_808, "gpt2-xl": 1_557_611_200, "llama-3.2-1b": 1_235_814_400,
                "llama-3.1-8b": 8_030_261_248, "qwen2.5-0.5b": 494_032_768,
                "mistral-7b": 7_241_732_096}
    for name, n in expected.items():
        assert param_count(preset(name)) == n, name
    for name in PRESETS:
        cfg = preset(name)
        if cfg.n_experts:  # counted: the weights a token is routed through, not every expert
            assert flops_per_token(cfg, 2048) < 6 * param_count(cfg), name
            continue
        assert flops_per_token(cfg, 2048) > 6 * (param_count(cfg) - cfg.vocab_size * cfg.d_model
                                                 * (2 if cfg.tie_embeddings else 1)) * 0.9
