"""Hugging Face config.json <-> ModelConfig: the field checks and the mapping in both directions.

Import (`hf_config_to_model_config`, `load_hf_config`) refuses any config.json field it does not
implement (`hf_fields.check_fields`; fields that change nothing are accepted by kind) rather
than build a silently different model; export (`model_config_to_hf`) is checked by importing its result back (`check_exportable`). The weights
themselves are read and written by hf.py.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Any

from dpo_jax.models.config import ModelConfig
from dpo_jax.models.hf_moe import MOE_MODEL_TYPES, moe_config_json, moe_fields
from dpo_jax.models.hf_fields import (  # noqa: F401  (re-exported)
    SUPPORTED_MODEL_TYPES, check_fields, model_type_of)

_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
         "gelu": "gelu", "silu": "silu", "swish": "silu", "relu": "relu"}


def resolve_path(path: str) -> str:
    """A local directory as is; otherwise a hub name fetched with snapshot_download."""
    if os.path.isdir(path):
        return path
    from huggingface_hub import snapshot_download

    return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.txt",
                                                   "*.model", "*.tiktoken"])


def _act(name: str) -> str:
    if name not in _ACTS:
        raise ValueError(f"config.json: unsupported activation {name!r}; known: {sorted(_ACTS)}")
    return _ACTS[name]


_ROPE_KEYS = {"default": set(), "linear": {"factor"},
              "llama3": {"factor", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings"},
              "longrope": {"short_factor", "long_factor", "factor", "attention_factor",
                           "original_max_position_embeddings"}}


def _rope(c: dict, default_theta: float = 10000.0) -> dict:
    """Rope settings from either transformers-5 `rope_parameters` or legacy keys; a scaling type
    or scaling field not implemented here is a ValueError naming it."""
    rp = dict(c.get("rope_parameters") or {})
    legacy = c.get("rope_scaling") or {}
    theta = rp.get("rope_theta", c.get("rope_theta", c.get("rotary_emb_base", default_theta)))
    scaling = {**legacy, **{k: v for k, v in rp.items() if k != "rope_theta"}}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    out: dict[str, Any] = dict(rope_theta=float(theta))
    kind = "default" if kind is None else kind
    if kind == "su" and c.get("model_type") == "phi3":  # Phi3Config's older name of longrope
        kind = "longrope"
    if kind not in _ROPE_KEYS:
        raise ValueError(f"config.json field 'rope_scaling' / 'rope_parameters': unsupported "
                         f"rope scaling type {kind!r} (supported: "
                         f"{sorted(_ROPE_KEYS)})")
    unknown = set(scaling) - _ROPE_KEYS[kind] - {"rope_type", "type", "partial_rotary_factor"}
    if unknown:
        raise ValueError(f"config.json field 'rope_scaling' / 'rope_parameters': rope scaling "
                         f"field(s) {sorted(unknown)} of type {kind!r} "
                         f"not implemented")
    if kind == "default":
        return out
    if kind == "longrope":
        return {**out, **_longrope(c, scaling)}
    out.update(rope_scaling=kind, rope_factor=float(scaling["factor"]))
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(scaling["low_freq_factor"]),
                   rope_high_freq_factor=float(scaling["high_freq_factor"]),
                   rope_original_max_len=int(scaling["original_max_position_embeddings"]))
    return out


def _longrope(c: dict, scaling: dict) -> dict:
    """LongRoPE as transformers' `_compute_longrope_parameters`: the pretraining length from
    the scaling block or (Phi-3) the top-level `original_max_position_embeddings`; factor
    None -> max_position_embeddings / original; attention_factor None -> sqrt(1 + ln(factor) /
    ln(original)) (1 when factor <= 1)."""
    original = scaling.get("original_max_position_embeddings",
                           c.get("original_max_position_embeddings"))
    if original is None:
        raise ValueError("config.json: rope scaling type 'longrope' needs "
                         "original_max_position_embeddings (the pretraining context length)")
    for name in ("short_factor", "long_factor"):
        if not isinstance(scaling.get(name), (list, tuple)):
            raise ValueError(f"config.json: rope scaling type 'longrope' needs {name} (a list), "
                             f"got {scaling.get(name)!r}")
    factor = scaling.get("factor")
    factor = c["max_position_embeddings"] / original if factor is None else float(factor)
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return dict(rope_scaling="longrope", rope_factor=float(factor),
                rope_original_max_len=int(original),
                rope_short_factor=tuple(float(x) for x in scaling["short_factor"]),
                rope_long_factor=tuple(float(x) for x in scaling["long_factor"]),
                rope_attention_factor=float(attention))


def _gemma3_rope(c: dict) -> dict:
    """Gemma 3: full layers use rope_theta (+ scaling), sliding layers an unscaled rope of
    rope_local_base_freq; transformers-5 nests both under rope_parameters by layer type."""
    rp = c.get("rope_parameters") or {}
    if "full_attention" in rp or "sliding_attention" in rp:
        full = _rope({"rope_parameters": rp.get("full_attention") or {}}, 1e6)
        local = _rope({"rope_parameters": rp.get("sliding_attention") or {}}, 1e4)
    else:
        full = _rope(c, 1e6)
        local = dict(rope_theta=float(c.get("rope_local_base_freq", 1e4)))
    if "rope_scaling" in local:
        raise ValueError(f"config.json: rope scaling of Gemma 3's sliding layers "
                         f"({local['rope_scaling']!r}) is not implemented")
    return {**full, "local_rope_theta": local["rope_theta"]}


def _layer_types(c: dict, mt: str, n_layer: int) -> dict:
    """sliding_window and per-layer types from config.json, with each model_type's defaults as
    transformers applies them (sliding windows are honoured, never dropped)."""
    window = c.get("sliding_window", 4096 if mt in ("mistral", "gemma2", "gemma3_text") else None)
    if mt in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and not c.get("use_sliding_window",
                                                                         False):
        window = None
    if window is None:
        return {}
    types = c.get("layer_types")
    if types is None:
        if mt in ("qwen2", "qwen3"):
            first = c.get("max_window_layers", 28)
            types = ["sliding_attention" if i >= first else "full_attention"
                     for i in range(n_layer)]
        elif mt == "qwen2_moe":  # Qwen2MoeConfig's default: odd layers below max_window_layers
            first = c.get("max_window_layers", 28)
            types = ["sliding_attention" if (i + 1) % 2 and i < first else "full_attention"
                     for i in range(n_layer)]
        elif mt == "gemma2":
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                     for i in range(n_layer)]
        elif mt == "gemma3_text":
            every = c.get("sliding_window_pattern", c.get("_sliding_window_pattern", 6))
            types = ["sliding_attention" if (i + 1) % every else "full_attention"
                     for i in range(n_layer)]
        else:
            types = ["sliding_attention"] * n_layer
    names = {"sliding_attention": "sliding", "full_attention": "full"}
    bad = sorted(set(types) - set(names))
    if bad or len(types) != n_layer:
        raise ValueError(f"config.json: layer_types {types!r}: expected {n_layer} entries of "
                         f"{sorted(names)}")
    return dict(sliding_window=int(window), layer_types=tuple(names[t] for t in types))


def _llama_like(c: dict, mt: str) -> dict:
    """The RMSNorm + gated-MLP + rotary decoders (Llama, Mistral, Qwen2/3, Gemma 2/3, Phi-3)."""
    n = c["num_attention_heads"]
    n_layer = c["num_hidden_layers"]
    gemma = mt in ("gemma2", "gemma3_text")
    head_default = {"gemma2": 256, "gemma3_text": 256, "qwen3": 128}.get(mt)
    act = c.get("hidden_activation", "gelu_pytorch_tanh") if gemma else c.get("hidden_act",
                                                                                "silu")
    kw = dict(vocab_size=c["vocab_size"], n_layer=n_layer, d_model=c["hidden_size"], n_head=n,
              n_kv_head=c.get("num_key_value_heads") or n,
              head_dim=c.get("head_dim") or head_default or c["hidden_size"] // n,
              d_ff=c["intermediate_size"], max_len=c["max_position_embeddings"],
              norm="rmsnorm", norm_eps=c.get("rms_norm_eps", 1e-5 if mt in ("phi3", "mixtral") else 1e-6),
              activation=_act(act), gated_mlp=True, position="rotary", rotary_style="half",
              tie_embeddings=c.get("tie_word_embeddings", gemma), qkv_bias=False,
              attn_out_bias=False, mlp_bias=False)
    kw.update(_gemma3_rope(c) if mt == "gemma3_text" else _rope(c, 1e6 if mt == "mixtral"
                                                                   else 1e4))
    kw.update(_layer_types(c, mt, n_layer))
    if mt == "llama":
        bias = bool(c.get("attention_bias", False))
        kw.update(family="llama", qkv_bias=bias, attn_out_bias=bias,
                  mlp_bias=bool(c.get("mlp_bias", False)))
    elif mt in ("mistral", "qwen2"):
        kw.update(family="llama", qkv_bias=mt == "qwen2")
    elif mt in MOE_MODEL_TYPES:
        kw.update(moe_fields(c, mt))
    elif mt == "qwen3":
        bias = bool(c.get("attention_bias", False))
        kw.update(family="qwen3", qk_norm=True, qkv_bias=bias, attn_out_bias=bias)
    elif gemma:
        bias = bool(c.get("attention_bias", False))
        g2 = mt == "gemma2"
        kw.update(family="gemma2" if g2 else "gemma3", qkv_bias=bias, attn_out_bias=bias,
                  qk_norm=not g2, norm_unit_offset=True, post_norms=True, embed_scale=True,
                  query_pre_attn_scalar=float(c.get("query_pre_attn_scalar", 256)),
                  attn_logit_softcap=c.get("attn_logit_softcapping", 50.0 if g2 else None),
                  final_logit_softcap=c.get("final_logit_softcapping", 30.0 if g2 else None))
    elif mt == "phi3":
        rp = c.get("rope_parameters") or {}
        pct = rp.get("partial_rotary_factor", c.get("partial_rotary_factor", 1.0))
        kw.update(family="phi3", rotary_dim=int(kw["head_dim"] * pct))
    return kw


def _gpt2_fields(c: dict) -> dict:
    """The ModelConfig fields that GPT-2 and GPT-J configs name alike (``n_embd``, ``n_layer``,
    ``n_head``, ``n_inner``, ``n_positions``, ``layer_norm_epsilon``, ``activation_function``)."""
    d = c["n_embd"]
    return dict(vocab_size=c["vocab_size"], n_layer=c["n_layer"], d_model=d, n_head=c["n_head"],
                d_ff=c.get("n_inner") or 4 * d, max_len=c["n_positions"],
                norm_eps=c.get("layer_norm_epsilon", 1e-5),
                activation=_act(c.get("activation_function", "gelu_new")))


def hf_config_to_model_config(c: dict, source: str = "config.json",
                              **overrides: Any) -> ModelConfig:
    """Map a parsed config.json (`source`: its name in error messages) to ModelConfig. An absent
    or unknown model_type, or a field / value the importer does not implement (check_fields,
    _rope, _layer_types), is a ValueError naming it."""
    mt = model_type_of(c, source)
    c = {**c, "model_type": mt}
    check_fields(c, source)
    if mt == "gpt2":
        kw = dict(family="gpt2", **_gpt2_fields(c),
                  tie_embeddings=c.get("tie_word_embeddings", True))
    elif mt == "gpt_neox":
        d, n = c["hidden_size"], c["num_attention_heads"]
        rp = c.get("rope_parameters") or {}
        pct = rp.get("partial_rotary_factor", c.get("rotary_pct", c.get("partial_rotary_factor",
                                                                        1.0)))
        rope = _rope(c)
        kw = dict(family="neox", vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"],
                  d_model=d, n_head=n, d_ff=c["intermediate_size"],
                  max_len=c["max_position_embeddings"], norm_eps=c.get("layer_norm_eps", 1e-5),
                  activation=_act(c.get("hidden_act", "gelu")), position="rotary",
                  rotary_dim=int((d // n) * pct), rotary_style="half",
                  parallel_residual=c.get("use_parallel_residual", True),
                  tie_embeddings=c.get("tie_word_embeddings", False),
                  qkv_bias=c.get("attention_bias", True),
                  attn_out_bias=c.get("attention_bias", True), **rope)
    elif mt == "gptj":
        kw = dict(family="gptj", **_gpt2_fields(c), position="rotary",
                  rotary_dim=c.get("rotary_dim") or c["n_embd"] // c["n_head"],
                  rotary_style="interleaved",
                  parallel_residual=True, shared_norm=True, tie_embeddings=False,
                  qkv_bias=False, attn_out_bias=False, lm_head_bias=True,
                  rope_theta=float(c.get("rope_theta", 10000.0)))
    else:
        kw = _llama_like(c, mt)
    return ModelConfig(**{**kw, **overrides})


def _listing(path: str) -> str:
    names = sorted(os.listdir(path))
    return ", ".join(names[:12]) + (f", ... ({len(names)} files)" if len(names) > 12 else "") \
        if names else "nothing"


def read_config_json(path: str) -> dict:
    """The parsed `<path>/config.json`. FileNotFoundError naming the file (and, for a directory
    holding only a GGUF file, what to do); ValueError naming the file, line and column of
    invalid JSON."""
    file = os.path.join(path, "config.json")
    if not os.path.exists(file):
        ggufs = sorted(os.path.basename(g) for g in glob.glob(os.path.join(path, "*.gguf")))
        if ggufs:
            raise FileNotFoundError(
                f"{file}: absent; {path} holds GGUF file(s) {ggufs}, a llama.cpp format dpo_jax "
                "does not read (quantized blocks, reordered query/key rows): convert it to a "
                "Hugging Face directory first (transformers: AutoModelForCausalLM.from_pretrained("
                "dir, gguf_file=...) then save_pretrained; see shared/models/smollm2.sh)")
        raise FileNotFoundError(f"{file}: absent (the directory holds {_listing(path)}); a "
                                "Hugging Face model directory needs config.json and safetensors")
    with open(file) as f:
        text = f.read()
    try:
        c = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON (line {e.lineno}, column {e.colno}: "
                         f"{e.msg})") from None
    if not isinstance(c, dict):
        raise ValueError(f"{file}: expected a JSON object of fields, got {type(c).__name__}")
    return c


def load_hf_config(path: str, **overrides: Any) -> ModelConfig:
    """ModelConfig from <path>/config.json (path: local dir or hub name); overrides e.g. dtype.
    A missing / invalid config.json (or a GGUF-only directory) is an error naming the file
    (read_config_json)."""
    path = resolve_path(path)
    return hf_config_to_model_config(read_config_json(path),
                                     source=os.path.join(path, "config.json"), **overrides)


def model_config_to_hf(cfg: ModelConfig) -> dict:
    """transformers config kwargs (legacy key names, accepted by transformers 4.45+ and 5.x)."""
    rope: dict[str, Any] = {}
    if cfg.rope_scaling == "linear":
        rope = dict(rope_scaling={"rope_type": "linear", "factor": cfg.rope_factor})
    elif cfg.rope_scaling == "llama3":
        rope = dict(rope_scaling={
            "rope_type": "llama3", "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len})
    elif cfg.rope_scaling == "longrope":
        rope = dict(rope_scaling={
            "rope_type": "longrope", "short_factor": list(cfg.rope_short_factor),
            "long_factor": list(cfg.rope_long_factor), "factor": cfg.rope_factor,
            "attention_factor": cfg.rope_attention_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len})
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "silu": "silu", "relu": "relu"}[cfg.activation]
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings)
    gpt2_fields = dict(n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head,
                       n_inner=cfg.d_ff, n_positions=cfg.max_len, layer_norm_epsilon=cfg.norm_eps,
                       activation_function=act, **common)  # GPT-2's and GPT-J's names
    if cfg.family == "gpt2":
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], **gpt2_fields)
    if cfg.family == "neox":
        return dict(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"],
                    hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                    num_attention_heads=cfg.n_head, intermediate_size=cfg.d_ff,
                    max_position_embeddings=cfg.max_len, layer_norm_eps=cfg.norm_eps,
                    hidden_act=act, rotary_pct=cfg.rotary_dim / cfg.head_dim,
                    rotary_emb_base=cfg.rope_theta, rope_theta=cfg.rope_theta,
                    use_parallel_residual=cfg.parallel_residual,
                    attention_bias=cfg.qkv_bias, **common)
    if cfg.family == "gptj":
        return dict(model_type="gptj", architectures=["GPTJForCausalLM"],
                    rotary_dim=cfg.rotary_dim, **gpt2_fields)
    sliding: dict[str, Any] = {}
    if cfg.sliding_window is not None:
        sliding = dict(sliding_window=cfg.sliding_window, layer_types=[
            "sliding_attention" if x else "full_attention" for x in cfg.sliding_layers])
    body = dict(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                head_dim=cfg.head_dim, intermediate_size=cfg.d_ff,
                max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
                rope_theta=cfg.rope_theta, **rope, **common)
    if cfg.family == "llama":
        qwen = cfg.qkv_bias and not cfg.attn_out_bias
        if qwen:
            extra = dict(use_sliding_window=bool(sliding), **sliding)
            return dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_act=act,
                        **extra, **body)
        if sliding:  # Mistral: every layer slides (MistralConfig has no layer_types)
            return dict(model_type="mistral", architectures=["MistralForCausalLM"],
                        hidden_act=act, sliding_window=cfg.sliding_window, **body)
        return dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_act=act,
                    attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias, **body)
    if cfg.family == "qwen3":
        return dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_act=act,
                    attention_bias=cfg.qkv_bias, use_sliding_window=bool(sliding), **sliding,
                    **body)
    if cfg.family in ("gemma2", "gemma3"):
        g2 = cfg.family == "gemma2"
        extra = {} if g2 else dict(rope_local_base_freq=cfg.local_rope_theta)
        return dict(model_type="gemma2" if g2 else "gemma3_text",
                    architectures=["Gemma2ForCausalLM" if g2 else "Gemma3ForCausalLM"],
                    hidden_activation="gelu_pytorch_tanh" if act == "gelu_new" else act,
                    attention_bias=cfg.qkv_bias, query_pre_attn_scalar=_number(
                        cfg.query_pre_attn_scalar),
                    attn_logit_softcapping=cfg.attn_logit_softcap,
                    final_logit_softcapping=cfg.final_logit_softcap,
                    sliding_window=cfg.sliding_window, layer_types=sliding.get("layer_types"),
                    **extra, **body)
    if cfg.n_experts:
        return moe_config_json(cfg, act, sliding, body)
    if cfg.family == "phi3":
        if cfg.rope_scaling == "longrope":  # Phi3Config also reads it outside rope_scaling
            body["original_max_position_embeddings"] = cfg.rope_original_max_len
        return dict(model_type="phi3", architectures=["Phi3ForCausalLM"], hidden_act=act,
                    partial_rotary_factor=cfg.rotary_dim / cfg.head_dim,
                    sliding_window=cfg.sliding_window, **body)
    raise ValueError(f"no HF export for family {cfg.family!r}")


def _number(x: float | None) -> float | int | None:
    """An integral float as int (transformers' strict configs type some fields as int)."""
    return int(x) if x is not None and float(x).is_integer() else x


_EXECUTION_FIELDS = ("dtype", "param_dtype", "remat", "attention_impl", "attention_chunk",
                     "attention_skip_blocks",
                     "scan_layers", "init_std", "moe_impl", "moe_kernel", "moe_tile",
                     "moe_expert_axis")


def check_exportable(cfg: ModelConfig, hf_cfg: dict) -> None:
    """The exported config.json must import back to the same model: a switch the target
    model_type cannot express is a ValueError naming the field, never a silently different
    checkpoint."""
    clean = {k: v for k, v in hf_cfg.items() if v is not None or k in (
        "attn_logit_softcapping", "final_logit_softcapping", "sliding_window")}
    back = hf_config_to_model_config(clean, **{f: getattr(cfg, f) for f in _EXECUTION_FIELDS})
    ours, theirs = dataclasses.asdict(cfg), dataclasses.asdict(back)
    if cfg.rope_scaling != "llama3":
        for f in ("rope_low_freq_factor", "rope_high_freq_factor") + (
                ("rope_original_max_len",) if cfg.rope_scaling != "longrope" else ()):
            ours.pop(f), theirs.pop(f)
    if cfg.rope_scaling is None:
        ours.pop("rope_factor"), theirs.pop("rope_factor")
    diff = sorted(k for k in ours if ours[k] != theirs[k])
    if diff:
        raise ValueError(f"cannot export as HF {hf_cfg['model_type']!r}: it cannot express "
                         + ", ".join(f"{k}={ours[k]!r} (would reload as {theirs[k]!r})"
                                     for k in diff))
