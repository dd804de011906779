"""The sampler: logps equal a full forward pass, top-k=1 is greedy, nucleus, EOS, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as PS

from dpo_jax import sharding as shard_lib
from dpo_jax.models import Model, preset
from dpo_jax.sampling import (SamplingConfig, filter_logits, generate, score_tokens,
                              sequence_mask)

jax.config.update("jax_default_matmul_precision", "highest")

LENS = np.array([5, 2, 7, 3, 1, 6, 4, 7], np.int32)
P = 7


@pytest.fixture(scope="module")
def built():
    cfg = preset("tiny-gpt2", n_layer=2, d_model=32, n_head=4, d_ff=64, max_len=32)
    model = Model(cfg)
    params = model.init(jax.random.key(0))
    # Sharpen the output layer a little so greedy paths are not all one token.
    params = jax.tree.map(lambda x: x * 3.0 if x.ndim == 2 else x, params)
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, 128, size=(len(LENS), P)).astype(np.int32)
    prompt[np.arange(P)[None, :] >= LENS[:, None]] = 99  # garbage in the padding: ignored
    return model, params, prompt


def _forward_logps(model, params, samples, lens):
    """log p(t | prefix) from one full forward on the sampled text (no cache)."""
    seg = sequence_mask(samples, jnp.asarray(lens))
    T = seg.shape[1]
    pos = jnp.broadcast_to(jnp.arange(T), seg.shape)
    logits = model.logits(params, samples.tokens_BT, pos, seg)
    lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    tok = samples.tokens_BT[:, 1:]
    out = jnp.take_along_axis(lp, tok[..., None], axis=-1)[..., 0]
    return np.asarray(jnp.pad(out, ((0, 0), (1, 0))) * samples.completion_mask_BT)


def test_logps_equal_full_forward_and_layout(built):
    model, params, prompt = built
    cfg = SamplingConfig(max_new_tokens=9, temperature=0.8, top_k=20, top_p=0.9, stop_ids=3)
    s = generate(model, params, prompt, LENS, jax.random.key(1), cfg)
    np.testing.assert_allclose(np.asarray(s.logps_BT), _forward_logps(model, params, s, LENS),
                               atol=2e-5)
    rescored = score_tokens(model, params, s.tokens_BT, sequence_mask(s, jnp.asarray(LENS)))
    np.testing.assert_allclose(np.asarray(rescored * s.completion_mask_BT), s.logps_BT, atol=2e-5)
    mask = np.asarray(s.completion_mask_BT)
    toks = np.asarray(s.tokens_BT)
    assert toks.shape == (len(LENS), P + 9)
    for b, n in enumerate(LENS):
        np.testing.assert_array_equal(toks[b, :n], prompt[b, :n])  # own prompt, then completion
        k = int(s.lengths_B[b])
        np.testing.assert_array_equal(mask[b], np.r_[np.zeros(n), np.ones(k), np.zeros(P + 9 - n - k)])
        assert (toks[b, n + k:] == 0).all()  # pad after the completion
        assert (np.asarray(s.logps_BT)[b][mask[b] > 0] < 0).all()
        assert (np.asarray(s.logps_BT)[b][mask[b] == 0] == 0).all()


@pytest.fixture(scope="module")
def greedy(built):
    """Greedy completions of ``built``'s prompts: 6 new tokens, no EOS id."""
    model, params, prompt = built
    return generate(model, params, prompt, LENS, jax.random.key(0),
                    SamplingConfig(max_new_tokens=6, temperature=0.0, stop_ids=()))


def test_top_k_one_is_greedy_and_greedy_is_argmax(built, greedy):
    model, params, prompt = built
    topk1 = generate(model, params, prompt, LENS, jax.random.key(7),
                     SamplingConfig(max_new_tokens=6, temperature=1.3, top_k=1, stop_ids=()))
    np.testing.assert_array_equal(greedy.tokens_BT, topk1.tokens_BT)
    np.testing.assert_allclose(greedy.logps_BT, topk1.logps_BT, atol=1e-6)
    # Each greedy token is the argmax of a full forward on its prefix.
    seg = sequence_mask(greedy, jnp.asarray(LENS))
    T = seg.shape[1]
    logits = model.logits(params, greedy.tokens_BT, jnp.broadcast_to(jnp.arange(T), seg.shape), seg)
    argmax = np.asarray(jnp.argmax(logits[:, :-1], axis=-1))
    mask = np.asarray(greedy.completion_mask_BT)[:, 1:] > 0
    np.testing.assert_array_equal(argmax[mask], np.asarray(greedy.tokens_BT)[:, 1:][mask])
    assert (np.asarray(greedy.lengths_B) == 6).all()  # no EOS id -> max_new_tokens bound


def test_top_p_keeps_smallest_nucleus_and_top_k():
    probs = np.array([[0.5, 0.05, 0.3, 0.15], [0.25, 0.25, 0.25, 0.25], [0.9, 0.04, 0.03, 0.03]])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    kept = lambda **kw: np.asarray(filter_logits(logits, **kw)) > -1e30
    # 0.5 < 0.7 -> add 0.3 (mass 0.8 >= 0.7): {0, 2}; uniform: mass before the 3rd is 0.5 < 0.7.
    np.testing.assert_array_equal(kept(top_p=0.7), [[1, 0, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    np.testing.assert_array_equal(kept(top_p=0.5), [[1, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    np.testing.assert_array_equal(kept(top_p=0.81), [[1, 0, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]])
    np.testing.assert_array_equal(kept(top_k=2)[0], [1, 0, 1, 0])
    np.testing.assert_array_equal(kept(top_k=3, top_p=0.6)[0], [1, 0, 1, 0])
    # Sampling frequencies follow the renormalised nucleus.
    from dpo_jax.sampling import sample_token

    cfg = SamplingConfig(max_new_tokens=1, top_p=0.7)
    draws = sample_token(jnp.repeat(logits[:1], 20000, 0), jax.random.key(3), cfg)
    freq = np.bincount(np.asarray(draws), minlength=4) / 20000
    np.testing.assert_allclose(freq, [0.625, 0, 0.375, 0], atol=0.015)


def test_eos_stops_row_and_later_tokens_are_pad(built, greedy):
    model, params, prompt = built
    # Make row 0's third greedy token the EOS id: row 0 must stop there, others not earlier.
    eos = int(greedy.tokens_BT[0, LENS[0] + 2])
    s = generate(model, params, prompt, LENS, jax.random.key(0),
                 SamplingConfig(max_new_tokens=6, temperature=0.0, stop_ids=eos, pad_id=0))
    toks, lens = np.asarray(s.tokens_BT), np.asarray(s.lengths_B)
    assert lens[0] <= 3 and toks[0, LENS[0] + lens[0] - 1] == eos
    for b, n in enumerate(LENS):
        comp = np.asarray(greedy.tokens_BT)[b, n:n + 6]
        hits = np.flatnonzero(comp == eos)
        expect = 6 if len(hits) == 0 else hits[0] + 1
        assert lens[b] == expect
        np.testing.assert_array_equal(toks[b, n:n + expect], comp[:expect])
        assert (toks[b, n + expect:] == 0).all()


def test_sharded_equals_unsharded_and_deterministic(built):
    model, params, prompt = built
    cfg = SamplingConfig(max_new_tokens=5, temperature=1.0, top_p=0.95, stop_ids=3)
    ref = generate(model, params, prompt, LENS, jax.random.key(11), cfg)
    again = generate(model, params, prompt, LENS, jax.random.key(11), cfg)
    other = generate(model, params, prompt, LENS, jax.random.key(12), cfg)
    np.testing.assert_array_equal(ref.tokens_BT, again.tokens_BT)
    assert not np.array_equal(ref.tokens_BT, other.tokens_BT)
    mesh = shard_lib.make_mesh({"data": 8, "fsdp": 1, "tensor": 1})
    rows = NamedSharding(mesh, PS("data"))
    run = jax.jit(lambda p, x, n, k: generate(model, p, x, n, k, cfg),
                  in_shardings=(NamedSharding(mesh, PS()), rows, rows, None))
    got = run(params, jax.device_put(prompt, rows), jax.device_put(LENS, rows), jax.random.key(11))
    assert len(got.tokens_BT.sharding.device_set) == 8
    np.testing.assert_array_equal(got.tokens_BT, ref.tokens_BT)
    np.testing.assert_allclose(got.logps_BT, ref.logps_BT, atol=1e-5)
    np.testing.assert_array_equal(got.lengths_B, ref.lengths_B)
