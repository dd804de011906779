"""The minimal sampler PPO uses (dpo_jax/sampling.py): cached decoding equals full forwards."""

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.models import Model, preset
from dpo_jax.sampling import SamplingConfig, generate

jax.config.update("jax_default_matmul_precision", "highest")


def test_greedy_generation_and_logps_match_full_forward_and_stop_at_eos():
    model = Model(preset("tiny-gpt2"))
    params = model.init(jax.random.key(0))
    lengths = np.array([3, 5, 1], np.int32)
    prompts = np.zeros((3, 5), np.int32)
    rng = np.random.default_rng(0)
    for b, n in enumerate(lengths):
        prompts[b, :n] = rng.integers(1, 128, n)
    N = 6
    # eos = the token greedy decoding emits first in row 0, so that row stops after one token.
    probe = generate(model, params, prompts, lengths, jax.random.key(1),
                     SamplingConfig(N, temperature=0.0, eos_id=-1))
    eos = int(probe.tokens_BT[0, lengths[0]])
    s = generate(model, params, prompts, lengths, jax.random.key(1),
                 SamplingConfig(N, temperature=0.0, eos_id=eos, pad_id=0))
    T = 5 + N
    assert s.tokens_BT.shape == (3, T)
    assert int(s.lengths_B[0]) == 1
    for b, n in enumerate(lengths):
        L = n + int(s.lengths_B[b])
        row = np.asarray(s.tokens_BT[b])
        np.testing.assert_array_equal(row[:n], prompts[b, :n])
        np.testing.assert_array_equal(np.asarray(s.completion_mask_BT[b]),
                                      (np.arange(T) >= n) & (np.arange(T) < L))
        assert np.all(row[L:] == 0)
        logits = model.logits(params, row[None, :L], np.arange(L)[None], np.ones((1, L), np.int32))[0]
        logp = jax.nn.log_softmax(logits, -1)
        for t in range(n, L):
            assert row[t] == int(jnp.argmax(logits[t - 1]))
            np.testing.assert_allclose(s.logps_BT[b, t], logp[t - 1, row[t]], rtol=1e-4, atol=1e-4)
        if int(s.lengths_B[b]) < N:  # stopped early: by its EOS
            assert row[L - 1] == eos


def test_top_k_one_equals_greedy():
    model = Model(preset("tiny-gpt2"))
    params = model.init(jax.random.key(0))
    prompts = np.array([[5, 6, 7]], np.int32)
    lengths = np.array([3], np.int32)
    g = generate(model, params, prompts, lengths, jax.random.key(2), SamplingConfig(4, temperature=0.0, eos_id=-1))
    k = generate(model, params, prompts, lengths, jax.random.key(2), SamplingConfig(4, top_k=1, eos_id=-1))
    np.testing.assert_array_equal(g.tokens_BT, k.tokens_BT)
