"""Mistral's sliding window, Qwen3, Gemma 2, Gemma 3, Phi-3, Mixtral, Qwen2-MoE and Qwen3-MoE
against tiny
random transformers
models (torch, float32, CPU): logits on padded and packed batches with sequences longer than
the window, the export round trip, greedy sampling past the window, a DPO step, and the
importer's refusal of config fields it does not implement."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dpo_jax import sampling  # noqa: E402
from dpo_jax.models import Model  # noqa: E402
from dpo_jax.models.hf import load_hf_params, save_hf  # noqa: E402
from dpo_jax.models.hf_config import hf_config_to_model_config, load_hf_config  # noqa: E402
from tests import helpers  # noqa: E402

torch.set_num_threads(2)

WINDOW = 8
BASE = helpers.TINY_HF_FIELDS
CASES = {
    "mistral-window": ("MistralConfig", dict(head_dim=16, sliding_window=WINDOW)),
    "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=False)),
    "qwen3-tied-window": ("Qwen3Config", dict(
        head_dim=16, tie_word_embeddings=True, use_sliding_window=True, sliding_window=WINDOW,
        max_window_layers=1)),
    # small soft-caps so that the tanh bends the scores and logits of these weights
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", dict(
        head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1000000.0}})),
    "phi3": ("Phi3Config", dict(sliding_window=WINDOW, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    # LongRoPE: positions past original_max_position_embeddings (16) switch to the long factors
    "phi3-longrope": ("Phi3Config", dict(original_max_position_embeddings=16, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "short_factor": [1.0, 1.5], "long_factor": [2.0, 4.0]})),
    # 4 experts, top-2: Mixtral renormalises the top-2 weights; Qwen2-MoE does not (unless
    # norm_topk_prob) and adds its sigmoid-gated shared expert
    "mixtral-window": ("MixtralConfig", dict(sliding_window=WINDOW, num_local_experts=4,
                                             num_experts_per_tok=2)),
    "qwen2-moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48)),
    "qwen2-moe-norm-window": ("Qwen2MoeConfig", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True,
        shared_expert_intermediate_size=16, tie_word_embeddings=True, use_sliding_window=True,
        sliding_window=WINDOW, max_window_layers=2)),  # layer 0 slides, layer 1 full
    # Qwen3-MoE: Qwen3's q/k norms, 8 experts top-3 renormalised (Qwen3-30B-A3B's
    # norm_topk_prob), no shared expert; every layer slides
    "qwen3-moe-window": ("Qwen3MoeConfig", dict(
        head_dim=16, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16,
        norm_topk_prob=True, use_sliding_window=True, sliding_window=WINDOW)),
}
GENERATING = ["mistral-window", "qwen3", "gemma2", "gemma3", "phi3", "phi3-longrope",
              "mixtral-window", "qwen2-moe", "qwen3-moe-window"]
LENS = [24, 17, 10]  # longest three times the window


def _batch():
    return helpers.padded_ids(LENS, low=3)


def _rel_err(ours, ref, sel):
    ours, ref = np.asarray(ours)[sel], ref[sel]
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """name -> (dir, hf_model, reference logits of _batch) for each tiny random model."""
    return helpers.random_hf_models(tmp_path_factory, CASES, BASE, *_batch(),
                                    attn_implementation="eager")


@pytest.fixture(scope="module")
def ours(hf_dirs):
    """name -> (cfg, params, jitted logits) imported from each directory."""
    out = {}
    for name, (path, _, _) in hf_dirs.items():
        cfg = load_hf_config(path)
        out[name] = (cfg, load_hf_params(path, cfg), jax.jit(Model(cfg).logits))
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers_padded_and_packed(name, hf_dirs, ours):
    _, hf_model, ref = hf_dirs[name]
    cfg, params, logits_fn = ours[name]
    ids, mask = _batch()
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    logits = logits_fn(params, ids, pos, mask)
    helpers.assert_logits_close(logits, ref, mask)
    print(f"{name}: padded max relative error {_rel_err(logits, ref, mask.astype(bool)):.2e}")
    # Packed: two sequences (each longer than the window) and padding in one row.
    a, b = ids[0, :13], ids[1, :9]
    row = np.concatenate([a, b, np.zeros(2, np.int32)])[None]
    seg = np.array([[1] * 13 + [2] * 9 + [0, 0]], np.int32)
    ppos = np.array([list(range(13)) + list(range(9)) + [0, 0]], np.int32)
    packed = np.asarray(logits_fn(params, row, ppos, seg))
    for piece, lo, hi in ((a, 0, 13), (b, 13, 22)):
        want = helpers.hf_logits(hf_model, piece[None])
        helpers.assert_logits_close(packed[:, lo:hi], want, np.ones((1, hi - lo)))


@pytest.mark.parametrize("name", list(CASES))
def test_export_roundtrip_reloads_in_transformers(name, hf_dirs, ours, tmp_path):
    _, _, ref = hf_dirs[name]
    cfg, params, _ = ours[name]
    save_hf(str(tmp_path), cfg, params)
    assert load_hf_config(str(tmp_path)) == cfg
    back = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), attn_implementation="eager").eval()
    ids, mask = _batch()
    helpers.assert_logits_close(helpers.hf_logits(back, ids, mask), ref, mask)


def test_switches_resolved(ours):
    mistral = ours["mistral-window"][0]
    assert (mistral.family, mistral.sliding_window, mistral.sliding_layers) == (
        "llama", WINDOW, (True, True))
    q3 = ours["qwen3-tied-window"][0]
    assert (q3.qk_norm, q3.qkv_bias, q3.tie_embeddings, q3.sliding_layers) == (
        True, False, True, (False, True))
    g2 = ours["gemma2"][0]
    assert (g2.attn_logit_softcap, g2.final_logit_softcap, g2.query_pre_attn_scalar,
            g2.sliding_layers, g2.activation, g2.norm_unit_offset, g2.post_norms,
            g2.embed_scale) == (5.0, 3.0, 24.0, (True, False), "gelu_tanh", True, True, True)
    g3 = ours["gemma3"][0]
    assert (g3.qk_norm, g3.local_rope_theta, g3.rope_theta, g3.rope_scaling,
            g3.final_logit_softcap) == (True, 10000.0, 1000000.0, "linear", None)
    q3m = ours["qwen3-moe-window"][0]
    assert (q3m.family, q3m.qk_norm, q3m.qkv_bias, q3m.n_experts, q3m.n_experts_per_tok,
            q3m.moe_d_ff, q3m.moe_renormalize, q3m.shared_expert_d_ff, q3m.sliding_layers) == (
        "qwen3_moe", True, False, 8, 3, 16, True, 0, (True, True))
    phi = ours["phi3"][0]
    assert (phi.family, phi.rotary_dim, phi.head_dim, phi.sliding_window) == (
        "phi3", 4, 8, WINDOW)


@pytest.mark.parametrize("name", GENERATING)
def test_greedy_sampling_matches_generate_past_the_window(name, hf_dirs, ours):
    """The KV-cache sampler's greedy continuation equals transformers.generate, rows of
    different prompt lengths in one batch, generating well past the window."""
    _, hf_model, _ = hf_dirs[name]
    cfg, params, _ = ours[name]
    ids, _ = _batch()
    lens, new = [5, 3], 14
    prompt = np.zeros((2, max(lens)), np.int32)
    for b, n in enumerate(lens):
        prompt[b, :n] = ids[b, :n]
    eos = 127
    got = sampling.generate(Model(cfg), params, prompt, np.array(lens), jax.random.key(0),
                            sampling.SamplingConfig(max_new_tokens=new, temperature=0.0,
                                                    stop_ids=eos, pad_id=0))
    for b, n in enumerate(lens):
        with torch.no_grad():
            want = hf_model.generate(torch.tensor(prompt[b:b + 1, :n], dtype=torch.long),
                                     max_new_tokens=new, do_sample=False, eos_token_id=eos,
                                     pad_token_id=0).numpy()[0, n:]
        k = int(got.lengths_B[b])
        assert n + k > WINDOW
        np.testing.assert_array_equal(np.asarray(got.tokens_BT)[b, n:n + k], want[:k])


@pytest.mark.parametrize("name", GENERATING)
def test_dpo_step_matches_transformers_logps(name, hf_dirs, ours):
    """One DPO train step (dpo_jax.step.make_train_step) on the imported model: the policy
    log-probs it reports equal PyTorch's on the same batch, and the parameters move."""
    _, hf_model, _ = hf_dirs[name]
    cfg, params, _ = ours[name]
    run = helpers.one_device_dpo_step(Model(cfg), params, helpers.loss_config(beta=0.1))
    batch_np, metrics = run.batch_np, run.metrics
    assert batch_np["input_ids"].shape[1] > WINDOW
    with torch.no_grad():
        logits = helpers.hf_logits(hf_model, batch_np["input_ids"],
                            (batch_np["segment_ids"] > 0).astype(np.int64)).astype(np.float64)
    logp = torch.log_softmax(torch.tensor(logits[:, :-1]), -1).numpy()
    tok = np.take_along_axis(logp, batch_np["input_ids"][:, 1:, None], axis=-1)[..., 0]
    seq = (tok * batch_np["loss_mask"][:, 1:]).sum(1)
    B = len(batch_np["pair_weight"])
    assert float(metrics["logps/chosen"]) == pytest.approx(seq[:B].mean(), rel=1e-4)
    assert float(metrics["logps/rejected"]) == pytest.approx(seq[B:].mean(), rel=1e-4)
    assert np.isfinite(float(metrics["loss"]))
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                         run.new_state.trainable, run.state.trainable)
    assert max(jax.tree.leaves(moved)) > 0


def test_final_softcap_is_never_dropped(ours):
    """Gemma 2's final logit soft-cap: Model.logits applies it; a log-prob path that calls
    Model.unembedding without applying it is refused."""
    cfg, params, _ = ours["gemma2"]
    with pytest.raises(ValueError, match="final_logit_softcap=3.0"):
        Model(cfg).unembedding(params)


def _config(name):
    cls, kw = CASES[name]
    return getattr(transformers, cls)(**BASE, **kw).to_dict()


@pytest.mark.parametrize("name, field, value, match", [
    ("mistral-window", "use_fancy_attention", True, "'use_fancy_attention' = True"),
    ("qwen3", "use_mrope", True, "'use_mrope' = True"),
    ("gemma3", "use_bidirectional_attention", True, "'use_bidirectional_attention' = True"),
    ("mistral-window", "attention_bias", True, "'attention_bias' = True"),
    ("phi3", "rope_parameters", {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4},
     "'yarn'"),
    ("phi3-longrope", "rope_parameters", {"rope_type": "longrope", "short_factor": [1.0] * 2,
                                          "long_factor": [1.0] * 2, "rope_theta": 1e4,
                                          "beta_slow": 1.0}, r"\['beta_slow'\]"),
    ("mistral-window", "rope_parameters", {"rope_type": "linear", "factor": 2.0,
                                           "rope_theta": 1e4, "beta_fast": 32},
     r"\['beta_fast'\]"),
    ("gemma2", "layer_types", ["sliding_attention", "chunked_attention"], "chunked_attention"),
    ("mistral-window", "model_type", "deepseek_v3", "'deepseek_v3'"),
    ("mixtral-window", "router_jitter_noise", 0.1, "'router_jitter_noise' = 0.1"),
    ("qwen2-moe", "decoder_sparse_step", 2, "'decoder_sparse_step' = 2"),
    ("qwen2-moe", "mlp_only_layers", [0], r"'mlp_only_layers' = \[0\]"),
    ("qwen2-moe", "router_type", "expert_choice", "'router_type' = 'expert_choice'"),
    ("qwen3-moe-window", "decoder_sparse_step", 2, "'decoder_sparse_step' = 2"),
    ("qwen3-moe-window", "mlp_only_layers", [1], r"'mlp_only_layers' = \[1\]"),
    ("qwen3-moe-window", "num_experts", 6, "'num_local_experts' = 8"),
    ("qwen3-moe-window", "max_window_layers", 1, "'max_window_layers' = 1"),
])
def test_unimplemented_config_fields_are_refused(name, field, value, match):
    c = _config(name)
    hf_config_to_model_config(c)  # the untouched config imports
    with pytest.raises(ValueError, match=match):
        hf_config_to_model_config({**c, field: value})


def test_export_refuses_what_the_model_type_cannot_express(ours, tmp_path):
    import dataclasses

    cfg, params, _ = ours["mistral-window"]
    # Mistral has no per-layer types: a Llama-family model with one full layer cannot export.
    mixed = dataclasses.replace(cfg, layer_types=("sliding", "full"))
    with pytest.raises(ValueError, match="layer_types"):
        save_hf(str(tmp_path), mixed, params)
    assert not (tmp_path / "model.safetensors").exists()
