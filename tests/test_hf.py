"""HF import/export against tiny random transformers models (torch, float32, CPU)."""

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dpo_jax.models import Model  # noqa: E402
from dpo_jax.models.hf import load_hf_params, save_hf  # noqa: E402
from dpo_jax.models.hf_config import load_hf_config  # noqa: E402
from tests import helpers  # noqa: E402

torch.set_num_threads(2)

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
SMALL = dict(vocab_size=128)
CASES = {
    "gpt2": ("GPT2Config", dict(n_positions=64, n_embd=32, n_layer=2, n_head=4)),
    "neox": ("GPTNeoXConfig", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=96, max_position_embeddings=64,
                                   rotary_pct=0.25, use_parallel_residual=True)),
    "neox-serial": ("GPTNeoXConfig", dict(hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, intermediate_size=64,
                                          max_position_embeddings=64, rotary_pct=0.5,
                                          use_parallel_residual=False, tie_word_embeddings=True)),
    "gptj": ("GPTJConfig", dict(n_positions=64, n_embd=64, n_layer=2, n_head=4, rotary_dim=8)),
    "llama3-gqa": ("LlamaConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       max_position_embeddings=64, rope_theta=500000.0,
                                       rope_scaling=LLAMA3, tie_word_embeddings=False)),
    "llama-tied-linear": ("LlamaConfig", dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "qwen2": ("Qwen2Config", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=64, tie_word_embeddings=True,
                                  rope_theta=1000000.0)),
    "mistral": ("MistralConfig", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=64, sliding_window=None)),
}

LENS = [12, 9, 4]


def _batch():
    return helpers.padded_ids(LENS)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """name -> (dir, hf_model, reference logits) for each tiny random model."""
    return helpers.random_hf_models(tmp_path_factory, CASES, SMALL, *_batch())


def _ours(path, **overrides):
    cfg = load_hf_config(path, **overrides)
    params = load_hf_params(path, cfg)
    ids, mask = _batch()
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    logits = jax.jit(Model(cfg).logits)(params, ids, pos, mask)
    return cfg, params, logits


@pytest.mark.parametrize("name", list(CASES))
def test_import_matches_transformers_and_export_roundtrips(name, hf_dirs, tmp_path):
    path, _, ref = hf_dirs[name]
    ids, mask = _batch()
    cfg, params, logits = _ours(path)
    helpers.assert_logits_close(logits, ref, mask)
    # Export, reload through transformers: same logits as the original.
    save_hf(str(tmp_path), cfg, params)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    helpers.assert_logits_close(helpers.hf_logits(back, ids, mask), ref, mask)


def test_family_switches_resolved(hf_dirs):
    cfg = load_hf_config(hf_dirs["gptj"][0])
    assert (cfg.shared_norm, cfg.lm_head_bias, cfg.qkv_bias, cfg.rotary_style) == (
        True, True, False, "interleaved")
    cfg = load_hf_config(hf_dirs["neox"][0])
    assert (cfg.rotary_dim, cfg.parallel_residual, cfg.tie_embeddings) == (4, True, False)
    cfg = load_hf_config(hf_dirs["llama3-gqa"][0])
    assert (cfg.n_kv_head, cfg.rope_scaling, cfg.rope_factor) == (2, "llama3", 8.0)
    cfg = load_hf_config(hf_dirs["qwen2"][0])
    assert (cfg.qkv_bias, cfg.attn_out_bias, cfg.tie_embeddings) == (True, False, True)


def test_sharded_load_from_index(hf_dirs, tmp_path):
    """Shards of a multi-file checkpoint, each placed straight into a NamedSharding."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    _, hf_model, _ = hf_dirs["llama3-gqa"]
    hf_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    cfg = load_hf_config(str(tmp_path))
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("a", "b"))
    axes = Model(cfg).logical_axes()
    is_t = lambda x: isinstance(x, tuple)
    plain = load_hf_params(hf_dirs["llama3-gqa"][0], cfg)
    # Contiguous slices read straight from the file (embed/heads/layers) and non-contiguous
    # ones (head_dim inside a fused [N*Dh] HF dim) that fall back to whole-layer reads.
    for rules in [{"layers": "a", "vocab": "a", "embed": "b", "heads": "a"},
                  {"mlp": "b", "head_dim": "b", "kv_heads": "a", "vocab": "b"}]:
        shardings = jax.tree.map(lambda a: NamedSharding(mesh, PartitionSpec(
            *[rules.get(n) if rules.get(n) not in [rules.get(m) for m in a[:k]] else None
              for k, n in enumerate(a)])), axes, is_leaf=is_t)
        params = load_hf_params(str(tmp_path), cfg, shardings)
        for got, want, s in zip(jax.tree.leaves(params), jax.tree.leaves(plain),
                                jax.tree.leaves(shardings)):
            assert got.sharding == s
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bf16_params(hf_dirs):
    path, _, ref = hf_dirs["llama3-gqa"]
    _, params, logits = _ours(path, param_dtype="bfloat16", dtype="bfloat16")
    assert all(x.dtype == jax.numpy.bfloat16 for x in jax.tree.leaves(params))
    ids, mask = _batch()
    sel = mask.astype(bool)
    err = np.abs(np.asarray(logits)[sel] - ref[sel]).max() / np.abs(ref[sel]).max()
    assert err < 5e-2


def test_errors(hf_dirs, tmp_path):
    from safetensors.numpy import load_file, save_file

    path, _, _ = hf_dirs["gpt2"]
    cfg = load_hf_config(path)
    tensors = load_file(os.path.join(path, "model.safetensors"))

    def refused(name, saved, error, match):
        """``saved`` as ``name``'s weights: loading them raises ``error`` matching ``match``."""
        os.makedirs(tmp_path / name)
        save_file(saved, str(tmp_path / name / "model.safetensors"))
        with pytest.raises(error, match=match):
            load_hf_params(str(tmp_path / name), cfg)

    missing = "transformer.h.1.mlp.c_fc.weight"
    refused("missing", {k: v for k, v in tensors.items() if k != missing},
            KeyError, r"transformer\.h\.1\.mlp\.c_fc\.weight.*\(32, 128\)")
    wrong_shape = {"transformer.h.0.attn.c_proj.weight": np.zeros((32, 16), np.float32)}
    refused("bad", {**tensors, **wrong_shape},
            ValueError, r"transformer\.h\.0\.attn\.c_proj\.weight.*\(32, 32\)")
    # unknown model_type
    unk = tmp_path / "unk"
    unk.mkdir()
    (unk / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert'"):
        load_hf_config(str(unk))
    (unk / "config.json").write_text(json.dumps({"model_type": "llama", "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0}, "num_attention_heads": 4, "hidden_size": 32,
        "num_hidden_layers": 1, "vocab_size": 8, "intermediate_size": 8,
        "max_position_embeddings": 8}))
    with pytest.raises(ValueError, match="'yarn'"):
        load_hf_config(str(unk))
