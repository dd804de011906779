"""LoRA's scaling alpha / rank (Hu et al. 2021) against a numpy merge, without torch or peft:
the JAX-only golden for the scale the PyTorch/peft export test (test_lora_export.py) also pins."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import lora as lora_lib
from dpo_jax.models import Model
from tests import helpers


def batch(num_pairs=8):
    return helpers.pair_batch(helpers.synthetic_pairs(num_pairs))


def ids(batch_):
    return batch_["input_ids"], batch_["positions"], batch_["segment_ids"]


def _np_merged(base, adapters, scale):
    """``W + scale * A @ B`` per adapted weight, by hand in float64 (A @ B over the flattened
    input and output axes, per layer; the LM head stored ``[V, D]`` takes ``(A @ B)^T``)."""
    out = jax.tree.map(lambda x: np.asarray(x, np.float64), base)
    layer_paths = {"q": ("attn", "q"), "o": ("attn", "o"), "down": ("mlp", "down")}
    for name, ab in adapters["lora"].items():
        a, b = np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64)
        r = a.shape[-1]
        if name == "lm_head":
            out["lm_head"] = out["lm_head"] + scale * (a @ b).T
            continue
        group, key = layer_paths[name]
        w = out["layers"][group][key]
        for layer in range(w.shape[0]):
            d = a[layer].reshape(-1, r) @ b[layer].reshape(r, -1)
            w[layer] = w[layer] + scale * d.reshape(w.shape[1:])
    return out


@pytest.mark.parametrize("rank,alpha", [(2, 6.0), (4, 2.0), (3, 16.0)])
def test_scale_is_alpha_over_rank_against_a_numpy_merge(rank, alpha):
    """LoRA's scaling (Hu et al. 2021, Sec. 4.1: ``delta W x`` scaled by ``alpha / r``; PEFT's
    ``scaling = lora_alpha / r``) without torch or peft: the adapted forward and ``merge`` equal
    the plain model whose targeted weights (attention q and o, MLP down, the LM head) are
    ``W + (alpha / rank) A B`` computed here in numpy from the given alpha and rank. The
    adapters are random (not the zero-B init); the golden for another scale (1, alpha,
    alpha / sqrt(rank)) is far outside the tolerance. rsLoRA (alpha / sqrt(rank)) is not a
    dpo_jax option."""
    cfg = helpers.tiny_model_config(tie_embeddings=False)
    model = lora_lib.LoraModel(cfg, lora_lib.LoraConfig(rank=rank, alpha=alpha,
                                                        targets=("q", "o", "down", "lm_head")))
    base = helpers.init_params(model)
    rng = np.random.default_rng(rank)
    adapters = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), jnp.float32),
                            model.abstract_adapters())
    b = batch()
    got = np.asarray(model.logits(lora_lib.join(base, adapters), *ids(b)), np.float64)
    plain = Model(cfg)

    def logits_at(scale):
        merged = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32),
                              _np_merged(base, adapters, scale))
        return np.asarray(plain.logits(merged, *ids(b)), np.float64)

    want = logits_at(alpha / rank)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for wrong in (1.0, alpha, alpha / np.sqrt(rank)):
        assert np.abs(logits_at(wrong) - want).max() > 1e-2, wrong
    merged = lora_lib.merge(model, base, adapters)
    want_w = _np_merged(base, adapters, alpha / rank)
    for path in (("layers", "attn", "q"), ("layers", "attn", "o"), ("layers", "mlp", "down"),
                 ("lm_head",)):
        g, w = merged, want_w
        for k in path:
            g, w = g[k], w[k]
        np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=1e-5, atol=1e-6,
                                   err_msg=str(path))
