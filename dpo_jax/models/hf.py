"""Import / export of Hugging Face checkpoints (config.json + safetensors) without torch.

Why explicit maps (hf_maps.py) rather than transformers' own conversion: every tensor's name,
shape and layout is checked, and each tensor is read straight into its target sharding, so a
model larger than one host's memory never exists unsharded on a host.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import numpy as np

from dpo_jax.models import hf_maps
from dpo_jax.models.config import ModelConfig
from dpo_jax.models.model import Model

SUPPORTED_MODEL_TYPES = ("gpt2", "gpt_neox", "gptj", "llama", "mistral", "qwen2")
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
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(_ACTS)}")
    return _ACTS[name]


def _rope(c: dict) -> dict:
    """Rope settings from either transformers-5 `rope_parameters` or legacy keys."""
    rp = dict(c.get("rope_parameters") or {})
    legacy = c.get("rope_scaling") or {}
    theta = rp.get("rope_theta", c.get("rope_theta", c.get("rotary_emb_base", 10000.0)))
    scaling = {**legacy, **{k: v for k, v in rp.items() if k != "rope_theta"}}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    out: dict[str, Any] = dict(rope_theta=float(theta))
    if kind in (None, "default"):
        return out
    if kind not in ("linear", "llama3"):
        raise ValueError(f"unsupported rope scaling type {kind!r} (supported: linear, llama3)")
    out.update(rope_scaling=kind, rope_factor=float(scaling["factor"]))
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(scaling["low_freq_factor"]),
                   rope_high_freq_factor=float(scaling["high_freq_factor"]),
                   rope_original_max_len=int(scaling["original_max_position_embeddings"]))
    return out


def hf_config_to_model_config(c: dict, **overrides: Any) -> ModelConfig:
    """Map a parsed config.json to ModelConfig; unknown model_type -> ValueError naming it."""
    mt = c.get("model_type")
    if mt == "gpt2":
        if c.get("scale_attn_by_inverse_layer_idx") or not c.get("scale_attn_weights", True):
            raise ValueError("gpt2 config with scale_attn_by_inverse_layer_idx=True or "
                             "scale_attn_weights=False is not supported")
        d = c["n_embd"]
        kw = dict(family="gpt2", vocab_size=c["vocab_size"], n_layer=c["n_layer"], d_model=d,
                  n_head=c["n_head"], d_ff=c.get("n_inner") or 4 * d, max_len=c["n_positions"],
                  norm_eps=c.get("layer_norm_epsilon", 1e-5),
                  activation=_act(c.get("activation_function", "gelu_new")),
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
        d = c["n_embd"]
        kw = dict(family="gptj", vocab_size=c["vocab_size"], n_layer=c["n_layer"], d_model=d,
                  n_head=c["n_head"], d_ff=c.get("n_inner") or 4 * d, max_len=c["n_positions"],
                  norm_eps=c.get("layer_norm_epsilon", 1e-5),
                  activation=_act(c.get("activation_function", "gelu_new")), position="rotary",
                  rotary_dim=c.get("rotary_dim") or d // c["n_head"], rotary_style="interleaved",
                  parallel_residual=True, shared_norm=True, tie_embeddings=False,
                  qkv_bias=False, attn_out_bias=False, lm_head_bias=True,
                  rope_theta=float(c.get("rope_theta", 10000.0)))
    elif mt in ("llama", "mistral", "qwen2"):
        n = c["num_attention_heads"]
        attn_bias = bool(c.get("attention_bias", False))
        kw = dict(family="llama", vocab_size=c["vocab_size"], n_layer=c["num_hidden_layers"],
                  d_model=c["hidden_size"], n_head=n,
                  n_kv_head=c.get("num_key_value_heads") or n,
                  head_dim=c.get("head_dim") or c["hidden_size"] // n,
                  d_ff=c["intermediate_size"], max_len=c["max_position_embeddings"],
                  norm="rmsnorm", norm_eps=c.get("rms_norm_eps", 1e-6),
                  activation=_act(c.get("hidden_act", "silu")), gated_mlp=True,
                  position="rotary", rotary_style="half",
                  tie_embeddings=c.get("tie_word_embeddings", False),
                  qkv_bias=True if mt == "qwen2" else attn_bias,
                  attn_out_bias=False if mt == "qwen2" else attn_bias,
                  mlp_bias=bool(c.get("mlp_bias", False)), **_rope(c))
    else:
        raise ValueError(f"unsupported HF model_type {mt!r}; supported: {SUPPORTED_MODEL_TYPES}")
    return ModelConfig(**{**kw, **overrides})


def load_hf_config(path: str, **overrides: Any) -> ModelConfig:
    """ModelConfig from <path>/config.json (path: local dir or hub name); overrides e.g. dtype."""
    with open(os.path.join(resolve_path(path), "config.json")) as f:
        return hf_config_to_model_config(json.load(f), **overrides)


class _Checkpoint:
    """Name -> safetensors handle over a single file or an index of shards (lazy, mmap'd)."""

    def __init__(self, path: str):
        from safetensors import safe_open

        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            single = os.path.join(path, "model.safetensors")
            if not os.path.exists(single):
                raise FileNotFoundError(f"no model.safetensors(.index.json) in {path}")
            files, weight_map = ["model.safetensors"], None
        self.handles = {f: safe_open(os.path.join(path, f), framework="np") for f in files}
        self.where = weight_map or {k: files[0] for k in self.handles[files[0]].keys()}

    def shape(self, name: str) -> tuple[int, ...] | None:
        if name not in self.where:
            return None
        return tuple(self.handles[self.where[name]].get_slice(name).get_shape())

    def read(self, name: str, index: tuple = ()) -> np.ndarray:
        sl = self.handles[self.where[name]].get_slice(name)
        return sl[index] if index else sl[:]


def _find_prefix(ckpt: _Checkpoint, cfg: ModelConfig, specs: list) -> str:
    first = next(t.name for t in specs if not t.layered and t.name not in hf_maps.HEAD_NAMES)
    for prefix in hf_maps.FAMILY_MAPS[cfg.family][1]:
        if prefix + first in ckpt.where:
            return prefix
    raise KeyError(f"missing tensor {first!r} (tried prefixes "
                   f"{hf_maps.FAMILY_MAPS[cfg.family][1]}) for family {cfg.family!r}")


def load_hf_params(path: str, cfg: ModelConfig, shardings: Any = None) -> dict:
    """Read a safetensors checkpoint into our parameter tree (dtype cfg.param_dtype).

    `shardings`: optional tree like the params of jax.sharding.Sharding. Each leaf is built by
    jax.make_array_from_callback, so a device only reads its own shard: stacked layer tensors
    read only the layers in the shard, and within a layer the contiguous HF range holding the
    device's slice (via get_slice; see hf_maps.slice_through). Fused qkv tensors (GPT-2,
    NeoX) and non-contiguous slices read one whole layer tensor, kept in a small LRU cache.
    """
    path = resolve_path(path)
    ckpt = _Checkpoint(path)
    specs = hf_maps.tensor_specs(cfg)
    prefix = _find_prefix(ckpt, cfg, specs)
    for t in specs:  # check every tensor's presence and shape before reading anything
        for i in range(cfg.n_layer) if t.layered else [None]:
            name = hf_maps.full_name(t.name, prefix, i)
            got = ckpt.shape(name)
            if got is None:
                raise KeyError(f"missing tensor {name!r} (expected shape {t.shape}) in {path}")
            if got != t.shape:
                raise ValueError(f"tensor {name!r}: expected shape {t.shape}, found {got}")

    dtype = np.dtype(cfg.param_dtype) if cfg.param_dtype != "bfloat16" else jax.numpy.bfloat16

    @functools.lru_cache(maxsize=8)
    def parts_of(t_index: int, layer: int | None) -> list[np.ndarray]:
        t = specs[t_index]
        raw = ckpt.read(hf_maps.full_name(t.name, prefix, layer))
        return [np.asarray(p, dtype) for p in t.split(raw)]

    owner: dict[tuple, tuple[int, int]] = {}
    for ti, t in enumerate(specs):
        for j, part in enumerate(t.parts):
            owner[(("layers",) + part) if t.layered else part] = (ti, j)

    abstract = Model(cfg).abstract_params()
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def build(path_keys: tuple, leaf: jax.ShapeDtypeStruct, sharding) -> jax.Array:
        key = tuple(getattr(k, "key", k) for k in path_keys)
        if key not in owner:
            raise KeyError(f"no HF tensor maps to parameter {'/'.join(key)}")
        ti, j = owner[key]
        t = specs[ti]

        layer_shape = leaf.shape[1:] if t.layered else leaf.shape

        def read(layer: int | None, index: tuple) -> np.ndarray:
            plan = hf_maps.slice_through(t, layer_shape, index)
            if plan is None:  # fused qkv or a non-contiguous slice: whole tensor (cached)
                return parts_of(ti, layer)[j][index]
            hf_index, block, residual = plan
            raw = ckpt.read(hf_maps.full_name(t.name, prefix, layer), hf_index)
            raw = raw.T if t.layout == "T" else raw
            return np.asarray(raw.reshape(block)[residual], dtype)

        def callback(index: tuple) -> np.ndarray:
            index = tuple(index) + (slice(None),) * (len(leaf.shape) - len(index))
            if t.layered:
                layers = range(*index[0].indices(leaf.shape[0]))
                return np.stack([read(i, index[1:]) for i in layers])
            return read(None, index)

        return jax.make_array_from_callback(leaf.shape, sharding or default, callback)

    if shardings is None:
        return jax.tree_util.tree_map_with_path(lambda p, x: build(p, x, None), abstract)
    return jax.tree_util.tree_map_with_path(build, abstract, shardings)


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
    act = {"gelu_tanh": "gelu_new", "gelu": "gelu", "silu": "silu", "relu": "relu"}[cfg.activation]
    common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings)
    if cfg.family == "gpt2":
        return dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_embd=cfg.d_model,
                    n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.d_ff,
                    n_positions=cfg.max_len, layer_norm_epsilon=cfg.norm_eps,
                    activation_function=act, **common)
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
        return dict(model_type="gptj", architectures=["GPTJForCausalLM"], n_embd=cfg.d_model,
                    n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.d_ff,
                    n_positions=cfg.max_len, rotary_dim=cfg.rotary_dim,
                    layer_norm_epsilon=cfg.norm_eps, activation_function=act, **common)
    qwen = cfg.qkv_bias and not cfg.attn_out_bias
    return dict(model_type="qwen2" if qwen else "llama",
                architectures=["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
                hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                head_dim=cfg.head_dim, intermediate_size=cfg.d_ff,
                max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps, hidden_act=act,
                rope_theta=cfg.rope_theta, attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias,
                **rope, **common)


def save_hf(path: str, cfg: ModelConfig, params: dict, tokenizer: Any = None) -> None:
    """Write config.json + model.safetensors (+ tokenizer files) loadable by
    transformers.AutoModelForCausalLM.from_pretrained. Gathers the params on this host."""
    from safetensors.numpy import save_file

    if cfg.family == "llama" and cfg.qkv_bias != cfg.attn_out_bias and cfg.attn_out_bias:
        raise ValueError("llama-family export needs qkv_bias == attn_out_bias, or qwen2 layout")
    if cfg.family == "gptj" and (cfg.qkv_bias or cfg.attn_out_bias or not cfg.lm_head_bias):
        raise ValueError("GPT-J export needs no attention biases and an lm_head bias")
    os.makedirs(path, exist_ok=True)
    hf_cfg = model_config_to_hf(cfg)
    try:
        import transformers

        conf = transformers.AutoConfig.for_model(**hf_cfg)
        conf.architectures = hf_cfg["architectures"]
        conf.save_pretrained(path)
    except ImportError:  # plain json is enough for transformers to read later
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2)

    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), params)
    prefix = hf_maps.FAMILY_MAPS[cfg.family][1][0]

    def get(p: tuple) -> np.ndarray:
        node = host
        for k in p:
            node = node[k]
        return node

    tensors = {}
    for t in hf_maps.tensor_specs(cfg):
        for i in range(cfg.n_layer) if t.layered else [None]:
            parts = [get(("layers",) + p)[i] if t.layered else get(p) for p in t.parts]
            tensors[hf_maps.full_name(t.name, prefix, i)] = np.ascontiguousarray(t.join(parts))
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
