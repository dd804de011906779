"""Real config.json files of published checkpoints import (issue 28 item 1), and bad model
directories are refused naming the file and field before a workdir is written (item 7).

Fixtures: tests/fixtures/hf_configs/<family>/<model>.json, verbatim copies of config.json files
vendored in public repositories; PROVENANCE.json gives each one's repository, path, commit and
sha256. Shapes are checked against the JSON's own fields and transformers' own reading of the
same JSON (its config class, and a model instantiated on the meta device for parameter counts).
"""

import glob
import hashlib
import json
import os

import numpy as np
import pytest

from dpo_jax.models import hf_fields
from dpo_jax.models.config import param_count
from dpo_jax.models.hf_config import hf_config_to_model_config

ROOT = os.path.join(os.path.dirname(__file__), "fixtures", "hf_configs")
PROVENANCE = json.load(open(os.path.join(ROOT, "PROVENANCE.json")))
SUPPORTED = [e for e in PROVENANCE if e["family"] != "unsupported"]


def _file(e):
    return os.path.join(ROOT, e["family"], e["name"] + ".json")


def _load(e):
    with open(_file(e)) as f:
        return json.load(f)


def test_fixtures_are_the_recorded_files():
    """Every fixture is listed with its source and its bytes are the recorded ones; >= 30
    supported-family configs across the families."""
    listed = {_file(e) for e in PROVENANCE}
    assert listed == set(glob.glob(os.path.join(ROOT, "*", "*.json")))
    for e in PROVENANCE:
        with open(_file(e), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == e["sha256"], e["name"]
        assert e["path"] and (e["repo"] or e["name"] == "SmolLM2-135M-Instruct"), e["name"]
    assert len(SUPPORTED) >= 30, len(SUPPORTED)
    families = {hf_fields.model_type_of(_load(e)) for e in SUPPORTED}
    assert len(families) >= 6, families


def _expected(c: dict) -> dict:
    """The shapes transformers reads from the same JSON (its config class, 5.x), independently
    of dpo_jax's mapping."""
    transformers = pytest.importorskip("transformers")
    mt = hf_fields.model_type_of(c)
    conf = transformers.AutoConfig.for_model(**{**c, "model_type": mt})
    if mt == "gpt2":
        d, n = conf.n_embd, conf.n_head
        return dict(n_layer=conf.n_layer, d_model=d, n_head=n, n_kv_head=n, head_dim=d // n,
                    d_ff=conf.n_inner or 4 * d, vocab_size=conf.vocab_size,
                    max_len=conf.n_positions, tie_embeddings=conf.tie_word_embeddings), conf
    n = conf.num_attention_heads
    head_dim = getattr(conf, "head_dim", None) or conf.hidden_size // n
    rope = conf.rope_parameters or {}
    out = dict(n_layer=conf.num_hidden_layers, d_model=conf.hidden_size, n_head=n,
               n_kv_head=getattr(conf, "num_key_value_heads", None) or n, head_dim=head_dim,
               d_ff=conf.intermediate_size, vocab_size=conf.vocab_size,
               max_len=conf.max_position_embeddings, tie_embeddings=conf.tie_word_embeddings)
    if "rope_theta" in rope:
        out["rope_theta"] = float(rope["rope_theta"])
        kind = rope.get("rope_type", "default")
        out["rope_scaling"] = None if kind == "default" else kind
        if kind != "default":
            out["rope_factor"] = float(rope["factor"])
    window = getattr(conf, "sliding_window", None)
    if mt in ("qwen2", "qwen3", "qwen3_moe") and not getattr(conf, "use_sliding_window", False):
        window = None
    out["sliding_window"] = window
    return out, conf


@pytest.mark.parametrize("entry", SUPPORTED, ids=lambda e: e["name"])
def test_published_config_imports_with_its_shapes(entry):
    c = _load(entry)
    cfg = hf_config_to_model_config(c)
    want, conf = _expected(c)
    got = {k: getattr(cfg, k) for k in want}
    assert got == want, entry["name"]
    # fields present in the JSON, read directly
    for ours, theirs in (("n_layer", "num_hidden_layers"), ("d_model", "hidden_size"),
                         ("n_kv_head", "num_key_value_heads"), ("head_dim", "head_dim"),
                         ("d_ff", "intermediate_size"), ("vocab_size", "vocab_size"),
                         ("n_layer", "n_layer"), ("d_model", "n_embd")):
        if c.get(theirs) is not None:
            assert getattr(cfg, ours) == c[theirs], (entry["name"], theirs)


@pytest.mark.parametrize("entry", SUPPORTED, ids=lambda e: e["name"])
def test_parameter_count_matches_transformers_and_model_card(entry):
    """dpo_jax's parameter count of the imported config equals the parameters of the
    transformers model built from the same JSON on the meta device (no memory)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    c = _load(entry)
    cfg = hf_config_to_model_config(c)
    _, conf = _expected(c)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(conf)
    theirs = sum(p.numel() for p in model.parameters())  # tied head counted once
    assert param_count(cfg) == theirs, entry["name"]


def test_unsupported_family_fixture_is_refused_by_name():
    for e in PROVENANCE:
        if e["family"] == "unsupported":
            c = _load(e)
            with pytest.raises(ValueError, match=rf"field 'model_type' = '{c['model_type']}'"):
                hf_config_to_model_config(c)


def test_inert_fields_are_accepted_by_kind_not_by_name():
    """Fields no fixture carries, of each inert kind, are accepted on a real config."""
    base = _load(next(e for e in SUPPORTED if e["name"] == "Llama-3.2-1B-Instruct"))
    want = hf_config_to_model_config(base)
    inert = {"_model_name_or_path": "x", "some_lib_version": "1.2", "unk_token_id": 0,
             "image_token_id": 5, "cls_token_ids": [1], "num_beams": 4, "top_p": 0.9,
             "output_past": True, "classifier_dropout": 0.3, "hidden_pdrop": 0.1,
             "num_labels": 3, "problem_type": "regression", "initializer_factor": 2.0,
             "gradient_checkpointing": True, "pretraining_tp": 2, "torchscript": True,
             "use_bfloat16": True, "pruned_heads": {}, "tie_encoder_decoder": False}
    for key, value in inert.items():
        assert hf_config_to_model_config({**base, key: value}) == want, key


@pytest.mark.parametrize("name,field,value", [
    ("Mistral-7B-Instruct-v0.3", "attention_bias", True),   # Mistral has no biases
    ("Qwen2.5-7B-Instruct", "mlp_bias", True),
    ("Llama-3.1-8B-Instruct", "rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
    ("Llama-3.1-8B-Instruct", "rope_scaling", {"type": "dynamic", "factor": 2.0}),
    ("Qwen3-8B", "quantization_config", {"quant_method": "awq", "bits": 4}),
    ("gpt2", "scale_attn_by_inverse_layer_idx", True),
    ("gpt2", "add_cross_attention", True),
    ("Mistral-7B-Instruct-v0.3", "pruned_heads", {"0": [1]}),
    ("Qwen3-8B", "use_mrope", True),
    ("gemma-2-9b-it", "sliding_window_size", 2048),  # legacy duplicate disagreeing
    ("gemma-2-9b-it", "hidden_act", "silu"),
    ("TinyLlama-1.1B-Chat-v1.0", "logits_scaling", 2.0),  # unknown field
    ("phi-4", "qk_layernorm", True),
])
def test_computation_changing_field_is_refused_by_name(name, field, value):
    c = _load(next(e for e in SUPPORTED if e["name"] == name))
    hf_config_to_model_config(c)
    with pytest.raises(ValueError, match=rf"field '{field}'"):
        hf_config_to_model_config({**c, field: value})


def test_generation_kind_covers_transformers_list():
    transformers = pytest.importorskip("transformers")
    keys = set(transformers.GenerationConfig._get_default_generation_params())
    assert keys <= hf_fields.GENERATION, sorted(keys - hf_fields.GENERATION)


def test_model_type_absent():
    c = _load(next(e for e in SUPPORTED if e["name"] == "distilgpt2"))
    assert "model_type" not in c and hf_config_to_model_config(c).family == "gpt2"
    with pytest.raises(ValueError, match="field 'model_type' is absent"):
        hf_config_to_model_config({k: v for k, v in c.items() if k != "architectures"})
    # two families named: which computation is meant cannot be told
    with pytest.raises(ValueError, match="field 'model_type' is absent"):
        hf_config_to_model_config({**c, "architectures": ["GPT2LMHeadModel",
                                                          "LlamaForCausalLM"]})


def test_a_numeric_version_field_is_not_a_marker():
    """'*_version' is a marker only as a string (a library version); a number may select a
    variant of the computation: refused by name."""
    c = _load(next(e for e in SUPPORTED if e["name"] == "Llama-3.2-1B-Instruct"))
    assert hf_config_to_model_config({**c, "attn_version": "2.1"}) == hf_config_to_model_config(c)
    with pytest.raises(ValueError, match=r"field 'attn_version' = 2 is not implemented"):
        hf_config_to_model_config({**c, "attn_version": 2})


# ---- the real SmolLM2 directory (shared/models/smollm2.sh), when present ----

def _smollm2_dir():
    root = os.environ.get("DPO_JAX_MODELS", os.path.expanduser("~/.cache/dpo_jax"))
    path = os.path.join(root, "smollm2-135m-instruct")
    return path if os.path.exists(os.path.join(path, "model.safetensors")) else None


@pytest.mark.slow
def test_smollm2_imports_and_matches_transformers_logits():
    path = _smollm2_dir()
    if path is None:
        pytest.skip("SmolLM2 directory absent (bash shared/models/smollm2.sh)")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import jax.numpy as jnp

    from dpo_jax.models import Model, load_hf_params
    from dpo_jax.models.hf_dir import check_hf_dir

    cfg = check_hf_dir(path)
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.vocab_size) == (
        30, 576, 9, 3, 49152) and cfg.tie_embeddings
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = tok("The capital of France is Paris, and the capital of Italy is",
              return_tensors="np")["input_ids"]
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(torch.from_numpy(ids)).logits.numpy()
    params = load_hf_params(path, cfg)
    T = ids.shape[1]
    got = np.asarray(Model(cfg).logits(params, jnp.asarray(ids), jnp.arange(T)[None],
                                       jnp.ones_like(jnp.asarray(ids))))
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-4, err
