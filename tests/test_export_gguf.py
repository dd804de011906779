"""GGUF export (dpo_jax/export_gguf.py), read back independently.

Each family's tiny random HF checkpoint is built here by ``transformers`` with a real-style
tokenizer (``dpo_jax.data.testing``), imported into dpo_jax, and written as GGUF in every type.
transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``: gguf-py's dequantizers
and transformers' GGUF->HF tensor map and config mapping) then gives the model whose logits
must equal dpo_jax's, and the tokenizer whose ids must equal the run's tokenizer's on texts
that include the chat template's rendering. transformers has no GGUF loader for GPT-NeoX: its
file is read with ``gguf.GGUFReader`` and mapped back onto ``GPTNeoXForCausalLM`` by a table
written here from llama.cpp's documented layout (the HF tensors unchanged).
"""

import os
import pathlib

import jax
import numpy as np
import pytest

from dpo_jax import export_gguf
from dpo_jax.data import testing as toks
from dpo_jax.models import Model, load_hf_config, load_hf_params, preset

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

# Max |logit difference| to dpo_jax (logits of size ~1.5 here; measured maxima over the
# families in the README's export section). F32 is round-off; the others are the weights'
# rounding: F16 10 mantissa bits, BF16 7, Q8_0 8-bit integers times an F16 scale per 32 values.
TOL = {"F32": 2e-5, "F16": 5e-3, "BF16": 3e-2, "Q8_0": 1e-1}
IDS = np.random.default_rng(0).integers(3, 300, (2, 24)).astype(np.int32)
CHAT = [{"role": "user", "content": "What is 12+30?"}, {"role": "assistant", "content": "42."},
        {"role": "user", "content": "Thanks!\n\nAnd in  words?"}]
TEXTS = ["Hello there! How are you today?", "  leading spaces\n\n\tand 12345 digits",
         "héllo wörld ☃ naïve", "The movie was great.<|im_end|> trailing"]


def _cfg(family, V):
    """The tiny transformers config of ``family``. Where transformers' GGUF config mapping
    leaves a field at its class default, the model uses that default (GPT-2 n_positions 1024,
    Qwen3 head_dim 128, Gemma head_dim = query_pre_attn_scalar 256 and soft-caps 50 / 30)."""
    T = transformers
    common = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  max_position_embeddings=64)
    if family == "llama":
        return T.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0,
                             tie_word_embeddings=False, **common)
    if family == "mistral":
        return T.MistralConfig(num_attention_heads=4, num_key_value_heads=1,
                               sliding_window=None, **common)
    if family == "qwen2":
        return T.Qwen2Config(num_attention_heads=4, num_key_value_heads=2, **common)
    if family == "qwen3":
        return T.Qwen3Config(num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                             **common)
    if family == "gemma2":
        return T.Gemma2Config(num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                              sliding_window=5, **common)
    if family == "gemma3":  # 7 layers: five sliding, one global, one sliding
        return T.Gemma3TextConfig(num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                                  sliding_window=5, **{**common, "num_hidden_layers": 7})
    if family == "phi3":
        return T.Phi3Config(num_attention_heads=4, num_key_value_heads=2, pad_token_id=2,
                            bos_token_id=1, eos_token_id=2, **common)
    if family == "gpt2":
        return T.GPT2Config(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=1024)
    if family == "neox":
        return T.GPTNeoXConfig(vocab_size=V, hidden_size=64, intermediate_size=96,
                               num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.5,
                               max_position_embeddings=64, tie_word_embeddings=False)
    raise KeyError(family)


# family -> the tokenizer its tiny model is saved with. The SentencePiece-style one goes with
# the llama architecture only: transformers reads a Gemma or Phi-3 file's SentencePiece
# vocabulary as the real Gemma / Phi-3 tokenizer (no prefix space; a prefix after every special
# token), which the Llama-2-style tokenizer built here is not.
TOKENIZERS = {
    "llama": toks.llama3_style_tokenizer, "mistral": lambda: toks.llama2_style_tokenizer(
        toks.MISTRAL_TEMPLATE), "qwen2": toks.chatml_tokenizer,
    "qwen3": lambda: toks.chatml_tokenizer(eos="<|endoftext|>"), "gemma2": toks.chatml_tokenizer,
    "gemma3": toks.llama3_style_tokenizer, "phi3": toks.llama3_style_tokenizer,
    "gpt2": toks.gpt2_style_tokenizer, "neox": toks.gpt2_style_tokenizer}
FAMILIES = list(TOKENIZERS)


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    """(family, HF dir, tokenizer, dpo_jax ModelConfig, params, dpo_jax logits on IDS)."""
    family = request.param
    d = tmp_path_factory.mktemp(f"gguf_{family}")
    tok = TOKENIZERS[family]()
    if tok.pad_token is None:  # as dpo_jax.data.load_tokenizer, which the export uses
        tok.pad_token = tok.eos_token
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_cfg(family, len(tok) + 5)).eval()
    with torch.no_grad():  # move every weight (norms off 1, biases off 0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(d)
    tok.save_pretrained(d)
    cfg = load_hf_config(str(d))
    params = load_hf_params(str(d), cfg)
    pos = np.broadcast_to(np.arange(IDS.shape[1], dtype=np.int32), IDS.shape)
    ours = np.asarray(Model(cfg).logits(params, IDS, pos, np.ones_like(IDS)))
    np.testing.assert_allclose(_logits(model, IDS), ours, atol=2e-5)  # the import is right
    return family, d, tok, cfg, params, ours


def _neox_from_gguf(path):
    """GPTNeoXForCausalLM from a GGUF file, mapped by this test's own table."""
    reader = gguf.GGUFReader(path)

    def field(key):
        f = reader.fields[f"gptneox.{key}"]
        return f.parts[f.data[0]][0].item()

    D, N = field("embedding_length"), field("attention.head_count")
    conf = transformers.GPTNeoXConfig(
        vocab_size=field("vocab_size"), hidden_size=D, num_hidden_layers=field("block_count"),
        num_attention_heads=N, intermediate_size=field("feed_forward_length"),
        rotary_pct=field("rope.dimension_count") / (D // N), rotary_emb_base=field(
            "rope.freq_base"), max_position_embeddings=field("context_length"),
        layer_norm_eps=field("attention.layer_norm_epsilon"),
        use_parallel_residual=bool(field("use_parallel_residual")), tie_word_embeddings=False)
    names = {"token_embd": "gpt_neox.embed_in", "output_norm": "gpt_neox.final_layer_norm",
             "output": "embed_out", "attn_norm": "input_layernorm",
             "attn_qkv": "attention.query_key_value", "attn_output": "attention.dense",
             "ffn_norm": "post_attention_layernorm", "ffn_up": "mlp.dense_h_to_4h",
             "ffn_down": "mlp.dense_4h_to_h"}
    state = {}
    for t in reader.tensors:
        parts = t.name.split(".")
        w = gguf.dequantize(t.data, t.tensor_type)
        if parts[0] == "blk":
            hf = f"gpt_neox.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
        else:
            hf = f"{names[parts[0]]}.{parts[1]}"
        state[hf] = torch.from_numpy(np.array(w, np.float32))
    model = transformers.GPTNeoXForCausalLM(conf).eval()
    if "lm_head.weight" in model.state_dict():  # transformers 5 names the head lm_head
        state["lm_head.weight"] = state.pop("embed_out.weight")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    return model


def _read_back(path):
    d, name = os.path.split(path)
    if gguf.GGUFReader(path).fields["general.architecture"].contents() == "gptneox":
        return _neox_from_gguf(path)
    return transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name).eval()


# F32 (exactness) and Q8_0 (the quantizer) in the default suite; F16 / BF16 with --run-slow.
@pytest.mark.parametrize("gguf_type", [t if t in ("F32", "Q8_0") else pytest.param(
    t, marks=pytest.mark.slow) for t in export_gguf.GGUF_TYPES])
def test_gguf_logits_equal_dpo_jax(tiny, gguf_type, tmp_path):
    family, _, tok, cfg, params, ours = tiny
    path = str(tmp_path / f"{family}.gguf")
    export_gguf.write_gguf(path, cfg, params, tok, gguf_type)
    err = np.abs(_logits(_read_back(path), IDS) - ours).max()
    print(f"GGUF {family} {gguf_type}: max |logit diff| {err:.3g}")
    assert err <= TOL[gguf_type], (family, gguf_type, err)
    if gguf_type != "F32":  # the file really holds the type: not the F32 numbers
        assert err > 1e-6


def test_gguf_tokenizer_ids_and_chat_template(tiny, tmp_path):
    family, d, tok, cfg, params, _ = tiny
    path = tmp_path / "m.gguf"
    export_gguf.write_gguf(str(path), cfg, params, tok, "Q8_0")
    if family == "neox":  # transformers' GGUF tokenizer builders, without its arch check
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

        arch, tok_dict, tok_config = get_gguf_tokenizer(str(path))
        backend, _ = convert_gguf_tokenizer(arch, tok_dict)
        theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, **tok_config)
    else:
        theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    texts = list(TEXTS)
    if tok.chat_template:
        texts.append(tok.apply_chat_template(CHAT, tokenize=False))
        texts.append(tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True))
    for text in texts:
        assert theirs(text)["input_ids"] == tok(text)["input_ids"], (family, text)
    from transformers.integrations.gguf import get_gguf_tokenizer

    _, _, meta = get_gguf_tokenizer(str(path))  # transformers' reading of the metadata
    assert meta.get("chat_template") == tok.chat_template
    for name in ("bos", "eos", "pad"):
        assert meta[f"{name}_token"] == getattr(tok, f"{name}_token"), name


@pytest.mark.parametrize("tiny", ["llama"], indirect=True)
def test_llama_without_the_rope_permutation_is_caught(tiny, tmp_path, monkeypatch):
    """The tolerance has teeth: the Llama file without llama.cpp's q/k row permutation reads
    back far outside it."""
    _, _, tok, cfg, params, ours = tiny
    monkeypatch.setattr(export_gguf, "_permute_rope", lambda w, n: w)
    path = str(tmp_path / "unpermuted.gguf")
    export_gguf.write_gguf(path, cfg, params, tok, "F32")
    assert np.abs(_logits(_read_back(path), IDS) - ours).max() > 2 * TOL["Q8_0"]


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("name, overrides, match", [
    ("tiny-gptj", {}, "family 'gptj'.*no GPT-J loader"),
    ("tiny-llama", {"sliding_window": 8, "max_len": 64}, "sliding_window=8"),
    ("tiny-llama", {"rope_scaling": "linear", "rope_factor": 2.0}, "rope_scaling='linear'"),
    ("tiny-llama", {"activation": "gelu_tanh"}, "activation='gelu_tanh'"),
])
def test_unrepresentable_models_are_refused_naming_the_field(name, overrides, match, tmp_path):
    cfg = preset(name, **overrides)
    params = jax.jit(Model(cfg).init)(jax.random.key(0))
    out = tmp_path / "x.gguf"
    with pytest.raises(ValueError, match=match):
        export_gguf.write_gguf(str(out), cfg, params, None, "F16")
    assert not out.exists() and not pathlib.Path(str(out) + ".partial").exists()


def test_gemma_scale_other_than_head_dim_and_unknown_type_are_refused(tmp_path):
    cfg = preset("tiny-llama")
    params = jax.jit(Model(cfg).init)(jax.random.key(0))
    with pytest.raises(ValueError, match="gguf_type='Q4_K' is not implemented.*Q8_0"):
        export_gguf.write_gguf(str(tmp_path / "x.gguf"), cfg, params, None, "Q4_K")
    g = preset("tiny-gemma")
    bad = preset("tiny-gemma", query_pre_attn_scalar=float(g.head_dim + 8))
    with pytest.raises(ValueError, match="query_pre_attn_scalar"):
        export_gguf.check_gguf(bad, "F16")
    assert not (tmp_path / "x.gguf").exists()


def test_tokenizer_llama_cpp_cannot_split_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")]))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="ab")
    with pytest.raises(ValueError, match="pre_tokenizer.*Whitespace.*no llama.cpp"):
        export_gguf.tokenizer_metadata(tok, 8, "tok_dir")
    with pytest.raises(ValueError, match="tok_dir: tokenizer id 2 is outside.*vocab_size=2"):
        export_gguf.tokenizer_metadata(tok, 2, "tok_dir")


# ----------------------------------------------------------------------------- the CLI path


def test_export_run_writes_gguf_of_a_run_checkpoint(tmp_path):
    """``export_run(fmt='gguf')``: the run's config.json names the HF source and tokenizer,
    its checkpoint holds the (moved) parameters; the file gives their logits."""
    from dpo_jax.checkpoint import Checkpointer
    from dpo_jax.config import base_config
    from dpo_jax.export import export_run

    tok = toks.chatml_tokenizer()
    src = tmp_path / "src"
    transformers.Qwen2ForCausalLM(_cfg("qwen2", len(tok))).save_pretrained(src)
    tok.save_pretrained(src)
    cfg = load_hf_config(str(src))
    params = jax.tree.map(lambda x: x + 0.01 * np.sign(np.asarray(x)),
                          load_hf_params(str(src), cfg))
    c = base_config()
    c.model.hf_path = str(src)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(c.to_json())
    ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"), async_save=False)
    ckpt.save(2, params, {"count": np.zeros((), np.int32)}, {"data": {}})
    ckpt.close()
    with pytest.raises(ValueError, match="gguf_type='Q2_K' is not implemented"):
        export_run(str(tmp_path / "run"), str(tmp_path / "bad.gguf"), fmt="gguf",
                   gguf_type="Q2_K")
    assert not (tmp_path / "bad.gguf").exists()
    out = export_run(str(tmp_path / "run"), str(tmp_path / "out" / "m.gguf"), fmt="gguf",
                     gguf_type="F32")
    pos = np.broadcast_to(np.arange(IDS.shape[1], dtype=np.int32), IDS.shape)
    ours = np.asarray(Model(cfg).logits(params, IDS, pos, np.ones_like(IDS)))
    np.testing.assert_allclose(_logits(_read_back(out), IDS), ours, atol=TOL["F32"], rtol=0)
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.name"].contents() == "src"
    assert reader.fields["tokenizer.chat_template"].contents() == tok.chat_template


SMOLLM = pathlib.Path(os.environ.get("DPO_JAX_MODELS", pathlib.Path.home() / ".cache" / "dpo_jax")
                      ) / "smollm2-135m-instruct"


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["F32", "Q8_0"])
def test_smollm2_gguf_logits_and_tokenizer(gguf_type, tmp_path):
    """SmolLM2-135M-Instruct (30 layers, GQA 9/3, tied, byte-level BPE, ChatML), when present
    (``$DPO_JAX_MODELS/smollm2-135m-instruct``)."""
    if not (SMOLLM / "model.safetensors").exists():
        pytest.skip(f"no SmolLM2-135M-Instruct at {SMOLLM} (set $DPO_JAX_MODELS)")
    from dpo_jax.data import load_tokenizer

    tok = load_tokenizer(str(SMOLLM))
    cfg = load_hf_config(str(SMOLLM))
    params = load_hf_params(str(SMOLLM), cfg)
    ids = np.array([tok(TEXTS[0] + " " + TEXTS[2])["input_ids"]], np.int32)
    pos = np.arange(ids.shape[1], dtype=np.int32)[None]
    ours = np.asarray(Model(cfg).logits(params, ids, pos, np.ones_like(ids)))
    path = export_gguf.write_gguf(str(tmp_path / "smol.gguf"), cfg, params, tok, gguf_type)
    err = np.abs(_logits(_read_back(path), ids) - ours).max()
    print(f"GGUF smollm2 {gguf_type}: max |logit diff| {err:.3g}, max |logit| "
          f"{np.abs(ours).max():.3g}")
    assert err <= {"F32": 5e-4, "Q8_0": 1.0}[gguf_type], err  # measured 8.8e-5, 0.70
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="smol.gguf")
    texts = TEXTS + [tok.apply_chat_template(CHAT, tokenize=False),
                     tok.apply_chat_template(CHAT[:1], tokenize=False,
                                             add_generation_prompt=True)]
    for text in texts:
        assert theirs(text)["input_ids"] == tok(text)["input_ids"], text


def test_lora_run_is_exported_merged(tmp_path):
    """A 2-step LoRA DPO run on a tiny Llama (adapters on every projection and the LM head):
    the GGUF file gives the adapted policy's logits (base + adapters, computed unmerged by
    ``LoraModel``), not the base's."""
    from dpo_jax.export import export_run
    from tests import runs

    base, config = runs.lora_llama_run(tmp_path, toks.gpt2_style_tokenizer())
    out = export_run(str(tmp_path / "run"), str(tmp_path / "m.gguf"), fmt="gguf",
                     gguf_type="F32")
    model, policy, _ = runs.lora_policy(config, tmp_path / "run")
    ids = IDS[:, :12] % 128
    pos = np.broadcast_to(np.arange(12, dtype=np.int32), ids.shape)
    want = np.asarray(model.logits(policy, ids, pos, np.ones_like(ids)))
    assert np.abs(_logits(base, ids) - want).max() > 1e-3  # the adapters changed the model
    np.testing.assert_allclose(_logits(_read_back(out), ids), want, atol=1e-4, rtol=0)


def test_missing_gguf_package_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ImportError, match=r"dpo_jax\[gguf\]"):
        export_gguf._gguf()


def test_llama3_rope_scaling_is_the_rope_freqs_tensor(tmp_path):
    """Llama 3's rope scaling: ``rope_freqs.weight`` holds, per frequency, transformers'
    unscaled inverse frequency over its llama3-scaled one (the divisor llama.cpp applies);
    transformers' GGUF loader ignores that tensor, so the weights it reads are put into a
    transformers Llama with the checkpoint's rope scaling, whose logits equal dpo_jax's."""
    tok = toks.llama3_style_tokenizer()
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    conf = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rope_theta=10000.0, rope_scaling=scaling)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(conf).eval()
    hf.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    cfg = load_hf_config(str(tmp_path / "src"))
    assert cfg.rope_scaling == "llama3"
    params = load_hf_params(str(tmp_path / "src"), cfg)
    path = export_gguf.write_gguf(str(tmp_path / "m.gguf"), cfg, params, tok, "F32")
    reader = gguf.GGUFReader(path)
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    Dh = 64 // 4
    unscaled = 1.0 / 10000.0 ** (np.arange(0, Dh, 2, dtype=np.float64) / Dh)
    want = unscaled / hf.model.rotary_emb.inv_freq.double().numpy()
    assert abs(want.max() - 8.0) < 1e-5 and abs(want.min() - 1.0) < 1e-5  # three regimes
    assert np.any((want > 1.01) & (want < 7.99))
    np.testing.assert_allclose(np.asarray(freqs.data, np.float64), want, rtol=1e-6)
    read = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    scaled = transformers.LlamaForCausalLM(conf).eval()
    scaled.load_state_dict(read.state_dict())
    ids = np.random.default_rng(1).integers(3, len(tok), (1, 200)).astype(np.int32)
    pos = np.arange(200, dtype=np.int32)[None]
    ours = np.asarray(Model(cfg).logits(params, ids, pos, np.ones_like(ids)))
    np.testing.assert_allclose(_logits(scaled, ids), ours, atol=TOL["F32"], rtol=0)
    assert np.abs(_logits(read, ids) - ours).max() > 1e-3  # the scaling matters at 200 tokens
