"""Write a policy as one GGUF file (llama.cpp, ollama, LM Studio) with its tokenizer.

    python -m dpo_jax.export --workdir=RUN --format=gguf --out=model.gguf [--gguf_type=F16]

The weights are the model's Hugging Face tensors (``hf.hf_tensors``: the layouts of
``hf_maps``) renamed to llama.cpp's tensor names (the GGUF spec's ``blk.{i}.attn_q`` ...)
by the per-architecture tables below, with llama.cpp's three layout conventions:

* ``llama`` architecture: the rows of ``attn_q`` / ``attn_k`` (weights and biases) are
  permuted per head from HF's rotate-half order to llama.cpp's interleaved rope pairs
  (row ``h, 2j + s`` of GGUF = row ``h, s * Dh/2 + j`` of HF);
* GPT-2: HF's Conv1D kernels are [in, out]; GGUF stores every matrix as torch Linear
  [out, in], so they are transposed;
* Gemma 2 / 3: RMSNorm weights are stored as ``1 + w`` (the scale llama.cpp multiplies by).

Llama 3's rope scaling is the tensor ``rope_freqs.weight`` [head_dim / 2]: the divisor
llama.cpp applies to each unscaled rope frequency (unscaled / scaled inverse frequency).

Tensor types (``GGUF_TYPES``): 1-D tensors (norms, biases) are always F32; matrices take the
file's type; with Q8_0 a matrix whose rows are not a multiple of the 32-value block is F16
(llama.cpp's fallback). The metadata holds the architecture's hyperparameters, the tokenizer
(``tokenizer.ggml.*``: tokens, types, merges or scores, BOS / EOS / UNK / PAD ids, whether BOS
/ EOS are added) and the chat template. Everything llama.cpp would compute differently is
refused before anything is written (``ValueError`` naming the field, ``check_gguf``): the
verification is transformers' own GGUF loader (``tests/test_export_gguf.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import numpy as np

from dpo_jax.models import ModelConfig
from dpo_jax.models import hf_config as hf_lib
from dpo_jax.models.hf import hf_tensors
from dpo_jax.models.layers import inv_frequencies

GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0")
# HF model_type (as dpo_jax exports it) -> llama.cpp architecture
ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
         "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3", "gpt2": "gpt2",
         "gpt_neox": "gptneox"}
REFUSED = {
    "gptj": "llama.cpp has no GPT-J loader (convert_hf_to_gguf.py has no GPT-J class)",
    "mixtral": "mixture-of-experts export is not implemented (llama.cpp stores experts "
               "stacked as ffn_*_exps; transformers' GGUF loader reads no Mixtral)",
    "qwen2_moe": "mixture-of-experts export is not implemented",
    "qwen3_moe": "mixture-of-experts export is not implemented",
}
# the activation each llama.cpp architecture hard-codes (ours: ModelConfig.activation)
_ACT = {"llama": ("silu",), "qwen2": ("silu",), "qwen3": ("silu",), "phi3": ("silu",),
        "gemma2": ("gelu_tanh",), "gemma3": ("gelu_tanh",), "gpt2": ("gelu_tanh",),
        "gptneox": ("gelu", "gelu_tanh")}
_LLAMA_LAYER = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
                "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
                "self_attn.k_norm": "attn_k_norm", "post_attention_layernorm": "ffn_norm",
                "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_GEMMA_LAYER = {**_LLAMA_LAYER, "post_attention_layernorm": "post_attention_norm",
                "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}
# per-layer HF module name (after the layer prefix) -> GGUF name (after "blk.{i}.")
_LAYER = {
    "llama": _LLAMA_LAYER, "qwen2": _LLAMA_LAYER, "qwen3": _LLAMA_LAYER,
    "gemma2": _GEMMA_LAYER, "gemma3": _GEMMA_LAYER,
    "phi3": {"input_layernorm": "attn_norm", "self_attn.qkv_proj": "attn_qkv",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"},
    "gpt2": {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
             "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"},
    "gptneox": {"input_layernorm": "attn_norm", "attention.query_key_value": "attn_qkv",
                "attention.dense": "attn_output", "post_attention_layernorm": "ffn_norm",
                "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down"},
}
_GLOBAL = {"embed_tokens": "token_embd", "wte": "token_embd", "embed_in": "token_embd",
           "wpe": "position_embd", "norm": "output_norm", "ln_f": "output_norm",
           "final_layer_norm": "output_norm", "lm_head": "output", "embed_out": "output"}
_NAME = re.compile(r"^(?:model\.|transformer\.|gpt_neox\.)?(?:(?:layers|h)\.(\d+)\.)?(.+)\."
                   r"(weight|bias)$")
# llama.cpp's sliding-window layer patterns (llama-model.cpp set_swa_pattern): layer i slides
# when i % n < n - 1; transformers' Gemma configs build the same default layer_types
_SWA_PATTERN = {"gemma2": 2, "gemma3": 6}


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("--format=gguf needs the `gguf` package: pip install 'dpo_jax[gguf]' "
                          "(or pip install gguf)") from e
    return gguf


def gguf_arch(cfg: ModelConfig) -> str:
    """The llama.cpp architecture ``cfg`` exports as; ``ValueError`` naming the family (or the
    HF model_type) when it has none."""
    if cfg.family in REFUSED:
        raise ValueError(f"cannot export family {cfg.family!r} to GGUF: {REFUSED[cfg.family]}")
    mt = hf_lib.model_config_to_hf(cfg)["model_type"]
    if mt not in ARCHS:
        raise ValueError(f"cannot export HF model_type {mt!r} (family {cfg.family!r}) to GGUF")
    return ARCHS[mt]


def check_gguf(cfg: ModelConfig, gguf_type: str) -> str:
    """The llama.cpp architecture of ``cfg``; ``ValueError`` naming the field when llama.cpp
    would compute a different model, or naming ``gguf_type`` when it is not in GGUF_TYPES."""
    if gguf_type not in GGUF_TYPES:
        raise ValueError(f"--gguf_type={gguf_type!r} is not implemented; use one of {GGUF_TYPES}")
    arch = gguf_arch(cfg)
    bad: list[str] = []

    def need(ok: bool, field: str, want: str) -> None:
        if not ok:
            bad.append(f"{field}={getattr(cfg, field)!r} (llama.cpp's {arch!r} needs {want})")

    need(cfg.activation in _ACT[arch], "activation", " or ".join(_ACT[arch]))
    need(cfg.rope_scaling is None or (arch, cfg.rope_scaling) == ("llama", "llama3"),
         "rope_scaling", "None (of the scalings, only Llama's 'llama3' is exported)")
    if arch in ("gpt2", "gptneox"):
        need(cfg.norm == "layernorm", "norm", "'layernorm'")
        for f in ("qkv_bias", "attn_out_bias", "mlp_bias"):
            need(getattr(cfg, f), f, "True")
        need(cfg.sliding_window is None, "sliding_window", "None")
    else:
        need(cfg.position == "rotary" and cfg.rotary_style == "half", "rotary_style",
             "'half' (HF's layout)")
        need(cfg.rotary_dim == cfg.head_dim, "rotary_dim", f"head_dim={cfg.head_dim}")
        need(cfg.norm == "rmsnorm", "norm", "'rmsnorm'")
        need(cfg.gated_mlp, "gated_mlp", "True")
        need(not cfg.mlp_bias and not cfg.attn_out_bias, "attn_out_bias", "False")
        need(not cfg.mlp_bias, "mlp_bias", "False")
        need(cfg.qkv_bias == (arch == "qwen2"), "qkv_bias", str(arch == "qwen2"))
        need(cfg.qk_norm == (arch in ("qwen3", "gemma3")), "qk_norm", str(arch in (
            "qwen3", "gemma3")))
    if arch == "gptneox":
        need(cfg.position == "rotary" and cfg.rotary_style == "half", "rotary_style", "'half'")
    gemma = arch in ("gemma2", "gemma3")
    need(cfg.post_norms == gemma and cfg.norm_unit_offset == gemma, "post_norms", str(gemma))
    need(cfg.query_pre_attn_scalar in (None, cfg.head_dim), "query_pre_attn_scalar",
         f"None or head_dim={cfg.head_dim} (llama.cpp infers the scale from the model size)")
    if gemma:
        n = _SWA_PATTERN[arch]
        want = tuple(i % n < n - 1 for i in range(cfg.n_layer))
        need(cfg.sliding_window is not None and tuple(cfg.sliding_layers) == want, "layer_types",
             f"sliding layers where layer % {n} < {n - 1}")
        if arch == "gemma3":
            need(cfg.local_rope_theta == 10000.0, "local_rope_theta", "10000.0 (hard-coded)")
    elif arch in ("llama", "qwen2", "qwen3", "phi3"):
        need(cfg.sliding_window is None or cfg.sliding_window >= cfg.max_len, "sliding_window",
             f"None or >= max_len={cfg.max_len} (sliding-window export is not implemented)")
    caps = arch == "gemma2"
    need((cfg.attn_logit_softcap is not None) == caps, "attn_logit_softcap",
         "a cap" if caps else "None")
    need((cfg.final_logit_softcap is not None) == caps, "final_logit_softcap",
         "a cap" if caps else "None")
    if bad:
        raise ValueError(f"cannot export this {cfg.family!r} model to GGUF: " + "; ".join(bad))
    return arch


def _hparams(arch: str, cfg: ModelConfig) -> dict[str, Any]:
    """``{arch}.*`` metadata: key (after the architecture) -> value (int: uint32, float:
    float32, bool)."""
    kv: dict[str, Any] = {
        "context_length": cfg.max_len, "embedding_length": cfg.d_model,
        "block_count": cfg.n_layer, "feed_forward_length": cfg.d_ff,
        "attention.head_count": cfg.n_head, "vocab_size": cfg.vocab_size}
    eps = "layer_norm_rms_epsilon" if cfg.norm == "rmsnorm" else "layer_norm_epsilon"
    kv[f"attention.{eps}"] = float(cfg.norm_eps)
    if cfg.position == "rotary":
        kv["rope.dimension_count"] = cfg.rotary_dim
        kv["rope.freq_base"] = float(cfg.rope_theta)
    if arch != "gpt2":
        kv["attention.head_count_kv"] = cfg.n_kv_head
    if arch not in ("gpt2", "gptneox"):
        kv["attention.key_length"] = kv["attention.value_length"] = cfg.head_dim
    if arch == "gptneox":
        kv["use_parallel_residual"] = bool(cfg.parallel_residual)
    if arch in _SWA_PATTERN:
        kv["attention.sliding_window"] = cfg.sliding_window
    if arch == "gemma2":
        kv["attn_logit_softcapping"] = float(cfg.attn_logit_softcap)
        kv["final_logit_softcapping"] = float(cfg.final_logit_softcap)
    return kv


def _permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows [n_head * Dh, ...] from HF's rotate-half order (pair j = rows j, j + Dh/2 of a
    head) to llama.cpp's interleaved order (pair j = rows 2j, 2j + 1)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def gguf_tensors(arch: str, cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array (numpy order, Linear [out, in]) of ``params``."""
    layer_map = _LAYER[arch]
    out: dict[str, np.ndarray] = {}
    for name, w in hf_tensors(cfg, params).items():
        m = _NAME.match(name)
        layer, module, kind = m.groups() if m else (None, name, "")
        table = _GLOBAL if layer is None else layer_map
        if module not in table:
            raise KeyError(f"no GGUF name for HF tensor {name!r} (architecture {arch!r})")
        gname = table[module] if layer is None else f"blk.{layer}.{table[module]}"
        w = np.asarray(w, np.float32)
        if arch == "gpt2" and layer is not None and w.ndim == 2:
            w = w.T  # Conv1D [in, out] -> [out, in]
        if arch == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
            w = _permute_rope(w, cfg.n_head if module.endswith("q_proj") else cfg.n_kv_head)
        if arch in _SWA_PATTERN and module.endswith("norm") and kind == "weight":
            w = w + np.float32(1.0)
        out[f"{gname}.{kind}"] = np.ascontiguousarray(w)
    if cfg.rope_scaling == "llama3":  # llama.cpp divides each rope frequency by its factor
        base = np.asarray(inv_frequencies(dataclasses.replace(cfg, rope_scaling=None)))
        out["rope_freqs.weight"] = (base / np.asarray(inv_frequencies(cfg))).astype(np.float32)
    if arch in ("gpt2", "gptneox") and "output.weight" not in out:
        out["output.weight"] = out["token_embd.weight"]  # llama.cpp requires an output matrix
    return out


def _tensor_type(gguf, name: str, w: np.ndarray, gguf_type: str):
    """The GGMLQuantizationType ``w`` is stored in (module docstring's rule)."""
    T = gguf.GGMLQuantizationType
    if w.ndim == 1 or gguf_type == "F32":
        return T.F32
    if gguf_type == "Q8_0" and w.shape[-1] % 32:
        return T.F16
    return T[gguf_type]


# ----------------------------------------------------------------------------- tokenizer

# The split regexes of byte-level pre-tokenizers (tokenizer.json's Split step before a
# ByteLevel without its own regex) that llama.cpp implements, by its tokenizer.ggml.pre name.
_SPLITS = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
             r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
}


def _pre_name(pre: dict | None, path: str) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level pre-tokenizer of tokenizer.json."""
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split"
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
        regex = steps[0].get("pattern", {}).get("Regex")
        for name, split in _SPLITS.items():
            if regex == split:
                return name
    raise ValueError(f"{path}: tokenizer pre_tokenizer {json.dumps(pre)} has no llama.cpp "
                     f"equivalent this exporter knows (byte-level GPT-2, Llama-3 or Qwen2 "
                     f"splits)")


def _space_prefix(pre: dict | None, norm: dict | None) -> bool:
    """Whether a SentencePiece-style tokenizer.json prepends '▁' to the text (Metaspace's
    prepend_scheme, or a Prepend normalizer as in older Llama-2 files)."""
    def steps(x: dict | None, key: str) -> list[dict]:
        return [] if x is None else x.get(key, [x]) if x.get("type") == "Sequence" else [x]

    return any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never"
               and p.get("add_prefix_space", True) for p in steps(pre, "pretokenizers")) or any(
        n.get("type") == "Prepend" for n in steps(norm, "normalizers"))


def tokenizer_metadata(tok: Any, vocab_size: int, path: str = "tokenizer") -> dict[str, Any]:
    """``tokenizer.*`` metadata of a transformers (fast) tokenizer for a model of
    ``vocab_size`` rows: key -> value (lists become GGUF arrays). Byte-level BPE is written as
    llama.cpp's ``gpt2`` model, SentencePiece-style BPE with byte fallback as ``llama`` (scores
    ``-id``, merges kept). Raises ValueError naming ``path`` for a tokenizer llama.cpp cannot
    reproduce or one larger than the model's vocabulary."""
    gguf = _gguf()
    spec = json.loads(tok.backend_tokenizer.to_str())
    model, pre, norm = spec["model"], spec.get("pre_tokenizer"), spec.get("normalizer")
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: tokenizer model {model.get('type')!r} is not exported to "
                         f"GGUF (BPE only)")
    spm = bool(model.get("byte_fallback"))
    if not spm and norm not in (None, {"type": "NFC"}):
        raise ValueError(f"{path}: normalizer {json.dumps(norm)} of a byte-level tokenizer has "
                         f"no llama.cpp equivalent")
    vocab = {**model["vocab"], **{a["content"]: a["id"] for a in spec["added_tokens"]}}
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"{path}: tokenizer id {max(vocab.values())} is outside the model's "
                         f"vocab_size={vocab_size}")
    TT = gguf.TokenType
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(TT.UNUSED)] * vocab_size
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = int(TT.BYTE if spm and re.fullmatch(r"<0x[0-9A-F]{2}>", text) else TT.NORMAL)
    for a in spec["added_tokens"]:
        types[a["id"]] = int(TT.CONTROL if a["special"] else TT.USER_DEFINED)
    if spm and model.get("unk_token") in vocab:
        types[vocab[model["unk_token"]]] = int(TT.UNKNOWN)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "llama" if spm else "gpt2",
        "tokenizer.ggml.pre": "default" if spm else _pre_name(pre, path),
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges}
    if spm:
        meta["tokenizer.ggml.scores"] = [-float(i) for i in range(vocab_size)]
        meta["tokenizer.ggml.add_space_prefix"] = _space_prefix(pre, norm)
    for key, attr in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                      ("unknown", "unk_token_id"), ("padding", "pad_token_id")):
        if getattr(tok, attr, None) is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = int(getattr(tok, attr))
    plain = tok("a b", add_special_tokens=False)["input_ids"]
    full = tok("a b")["input_ids"]
    start = full.index(plain[0]) if plain[0] in full else -1
    head, tail = full[:start], full[start + len(plain):]
    if start < 0 or head not in ([], [tok.bos_token_id]) or tail not in ([], [tok.eos_token_id]):
        raise ValueError(f"{path}: the tokenizer adds {head} before and {tail} after a text; "
                         f"GGUF can only say whether BOS and EOS are added")
    meta["tokenizer.ggml.add_bos_token"] = bool(head)
    meta["tokenizer.ggml.add_eos_token"] = bool(tail)
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):
        for name, text in template.items():
            meta["tokenizer.chat_template" + ("" if name == "default" else f".{name}")] = text
    elif template:
        meta["tokenizer.chat_template"] = template
    return meta


# ----------------------------------------------------------------------------- writing


def write_gguf(out: str, cfg: ModelConfig, params: dict, tokenizer: Any = None,
               gguf_type: str = "F16", name: str = "dpo_jax") -> str:
    """Write ``params`` of the model ``cfg`` (and ``tokenizer``, a transformers tokenizer, when
    given) to the GGUF file ``out`` with matrices in ``gguf_type``; returns ``out``.

    Everything is checked (``check_gguf``, ``tokenizer_metadata``) before the file is
    created; the file is written beside ``out`` and renamed into place. Raises ValueError
    (unrepresentable model, tokenizer or type) or ImportError (no ``gguf`` package)."""
    gguf = _gguf()
    arch = check_gguf(cfg, gguf_type)
    tok_meta = tokenizer_metadata(tokenizer, cfg.vocab_size) if tokenizer is not None else {}
    tensors = gguf_tensors(arch, cfg, params)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".partial"
    writer = gguf.GGUFWriter(tmp, arch)
    writer.add_name(name)
    writer.add_file_type(int(gguf.LlamaFileType[
        "ALL_F32" if gguf_type == "F32" else f"MOSTLY_{gguf_type}"]))
    if gguf_type == "Q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    meta = {f"{arch}.{k}": v for k, v in _hparams(arch, cfg).items()} | tok_meta
    for key, value in meta.items():  # GGUF value types by Python type
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, (int, np.integer)):
            writer.add_uint32(key, int(value))
        elif isinstance(value, (float, np.floating)):
            writer.add_float32(key, float(value))
        else:
            writer.add_string(key, value)
    for tname, w in tensors.items():
        qtype = _tensor_type(gguf, tname, w, gguf_type)
        data = gguf.quants.quantize(w, qtype)
        writer.add_tensor(tname, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)
    return out
