"""Explicit name maps and layout transforms between HF checkpoints and our parameter tree.

Each `HFTensor` is one tensor in the safetensors file; `parts` are the paths of our parameters it
holds (several for fused qkv), `split` turns the HF array into those parts (our layouts) and `join`
is its inverse for export. Layer tensors use `{i}` in the name and map to one layer's slice of our
stacked parameters. Layout notes:
  * torch nn.Linear stores [out, in]; our kernels are [in, ...out]  -> transpose + reshape.
  * GPT-2 Conv1D stores [in, out] already                           -> reshape only.
  * GPT-2 c_attn is [D, 3D] = q | k | v along columns.
  * NeoX query_key_value rows are per head [N, 3, Dh] (q, k, v interleaved per head).
  * Phi-3 qkv_proj rows are q [N*Dh] | k [K*Dh] | v [K*Dh]; gate_up_proj rows gate [F] | up [F].
  * Mixtral / Qwen2-MoE / Qwen3-MoE store one tensor per expert (`experts.{e}.w1` ...); ours stack them
    along an `expert` axis after `layers`; the router `gate.weight` is [E, D], ours [D, E].
  * Gemma's `post_attention_layernorm` normalises the attention output (our post_attn_norm);
    its MLP input norm is `pre_feedforward_layernorm` (our ln2). In Llama the same HF name is
    the MLP input norm.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from dpo_jax.models.config import ModelConfig

Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class HFTensor:
    name: str  # may contain {i} (layer index); without the checkpoint prefix
    shape: tuple[int, ...]
    parts: tuple[Path, ...]  # our parameter paths (layer paths relative to 'layers')
    split: Callable[[np.ndarray], list[np.ndarray]]
    join: Callable[[list[np.ndarray]], np.ndarray]
    layered: bool = False
    layout: str = "fused"  # T: ours = hf.T.reshape; R: ours = hf.reshape; fused: several parts
    # > 0: one tensor per expert, `{e}` in the name; each maps to expert e's slice of our
    # parameter, whose `expert` axis follows the `layers` axis ([L, E, ...])
    experts: int = 0


def _T(name: str, hf_shape: tuple, part: Path, ours: tuple, layered: bool = True) -> HFTensor:
    """torch Linear weight [out, in] <-> our [in, ...] kernel (or [..., out] for o_proj)."""
    return HFTensor(name, hf_shape, (part,), lambda w: [w.T.reshape(ours)],
                    lambda o: o[0].reshape(hf_shape[::-1]).T, layered, "T")


def _R(name: str, hf_shape: tuple, part: Path, ours: tuple, layered: bool = True) -> HFTensor:
    """Same memory order, only a reshape (Conv1D kernels, biases, norms, embeddings)."""
    return HFTensor(name, hf_shape, (part,), lambda w: [w.reshape(ours)],
                    lambda o: o[0].reshape(hf_shape), layered, "R")


def _norm(name: str, part: str, cfg: ModelConfig, layered: bool = True) -> list[HFTensor]:
    D = cfg.d_model
    out = [_R(f"{name}.weight", (D,), (part, "scale"), (D,), layered)]
    if cfg.norm == "layernorm":
        out.append(_R(f"{name}.bias", (D,), (part, "bias"), (D,), layered))
    return out


def _head(cfg: ModelConfig, name: str) -> list[HFTensor]:
    V, D = cfg.vocab_size, cfg.d_model
    out = []
    if not cfg.tie_embeddings:
        out.append(_R(f"{name}.weight", (V, D), ("lm_head",), (V, D), False))
    if cfg.lm_head_bias:
        out.append(_R(f"{name}.bias", (V,), ("lm_head_bias",), (V,), False))
    return out


def _mlp_linear(cfg: ModelConfig, up: str, down: str, gate: str | None = None) -> list[HFTensor]:
    D, F = cfg.d_model, cfg.d_ff
    out = [_T(f"{up}.weight", (F, D), ("mlp", "up"), (D, F)),
           _T(f"{down}.weight", (D, F), ("mlp", "down"), (F, D))]
    if gate:
        out.append(_T(f"{gate}.weight", (F, D), ("mlp", "gate"), (D, F)))
    if cfg.mlp_bias:
        out += [_R(f"{up}.bias", (F,), ("mlp", "up_bias"), (F,)),
                _R(f"{down}.bias", (D,), ("mlp", "down_bias"), (D,))]
        if gate:
            out.append(_R(f"{gate}.bias", (F,), ("mlp", "gate_bias"), (F,)))
    return out


def _separate_attn(cfg: ModelConfig, pre: str, names: tuple[str, str, str, str]) -> list[HFTensor]:
    D, N, K, Dh = cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    q, k, v, o = (f"{pre}.{n}" for n in names)
    out = [_T(f"{q}.weight", (N * Dh, D), ("attn", "q"), (D, N, Dh)),
           _T(f"{k}.weight", (K * Dh, D), ("attn", "k"), (D, K, Dh)),
           _T(f"{v}.weight", (K * Dh, D), ("attn", "v"), (D, K, Dh)),
           _T(f"{o}.weight", (D, N * Dh), ("attn", "o"), (N, Dh, D))]
    if cfg.qkv_bias:
        out += [_R(f"{q}.bias", (N * Dh,), ("attn", "q_bias"), (N, Dh)),
                _R(f"{k}.bias", (K * Dh,), ("attn", "k_bias"), (K, Dh)),
                _R(f"{v}.bias", (K * Dh,), ("attn", "v_bias"), (K, Dh))]
    if cfg.attn_out_bias:
        out.append(_R(f"{o}.bias", (D,), ("attn", "o_bias"), (D,)))
    return out


def _gpt2(cfg: ModelConfig) -> list[HFTensor]:
    D, N, Dh, F, V = cfg.d_model, cfg.n_head, cfg.head_dim, cfg.d_ff, cfg.vocab_size
    qkv = (("attn", "q"), ("attn", "k"), ("attn", "v"))
    h = "h.{i}"
    out = [_R("wte.weight", (V, D), ("embed",), (V, D), False),
           _R("wpe.weight", (cfg.max_len, D), ("pos_embed",), (cfg.max_len, D), False),
           HFTensor(f"{h}.attn.c_attn.weight", (D, 3 * D), qkv,
                    lambda w: [p.reshape(D, N, Dh) for p in np.split(w, 3, axis=1)],
                    lambda o: np.concatenate([p.reshape(D, D) for p in o], axis=1), True),
           _R(f"{h}.attn.c_proj.weight", (D, D), ("attn", "o"), (N, Dh, D)),
           _R(f"{h}.mlp.c_fc.weight", (D, F), ("mlp", "up"), (D, F)),
           _R(f"{h}.mlp.c_proj.weight", (F, D), ("mlp", "down"), (F, D))]
    if cfg.qkv_bias:
        out.append(HFTensor(f"{h}.attn.c_attn.bias", (3 * D,), tuple(p[:1] + (p[1] + "_bias",)
                                                                    for p in qkv),
                            lambda b: [p.reshape(N, Dh) for p in np.split(b, 3)],
                            lambda o: np.concatenate([p.reshape(D) for p in o]), True))
    if cfg.attn_out_bias:
        out.append(_R(f"{h}.attn.c_proj.bias", (D,), ("attn", "o_bias"), (D,)))
    if cfg.mlp_bias:
        out += [_R(f"{h}.mlp.c_fc.bias", (F,), ("mlp", "up_bias"), (F,)),
                _R(f"{h}.mlp.c_proj.bias", (D,), ("mlp", "down_bias"), (D,))]
    out += _norm(f"{h}.ln_1", "ln1", cfg) + _norm(f"{h}.ln_2", "ln2", cfg)
    out += _norm("ln_f", "final_norm", cfg, False) + _head(cfg, "lm_head")
    return out


def _neox(cfg: ModelConfig) -> list[HFTensor]:
    D, N, Dh, V = cfg.d_model, cfg.n_head, cfg.head_dim, cfg.vocab_size
    a = "layers.{i}.attention"
    qkv = (("attn", "q"), ("attn", "k"), ("attn", "v"))
    out = [_R("embed_in.weight", (V, D), ("embed",), (V, D), False),
           HFTensor(f"{a}.query_key_value.weight", (3 * N * Dh, D), qkv,
                    lambda w: [w.reshape(N, 3, Dh, D)[:, j].transpose(2, 0, 1) for j in range(3)],
                    lambda o: np.stack([p.transpose(1, 2, 0) for p in o], axis=1).reshape(
                        3 * N * Dh, D), True),
           _T(f"{a}.dense.weight", (D, N * Dh), ("attn", "o"), (N, Dh, D))]
    if cfg.qkv_bias:
        out.append(HFTensor(f"{a}.query_key_value.bias", (3 * N * Dh,),
                            tuple(p[:1] + (p[1] + "_bias",) for p in qkv),
                            lambda b: [b.reshape(N, 3, Dh)[:, j] for j in range(3)],
                            lambda o: np.stack(o, axis=1).reshape(-1), True))
    if cfg.attn_out_bias:
        out.append(_R(f"{a}.dense.bias", (D,), ("attn", "o_bias"), (D,)))
    out += _mlp_linear(cfg, "layers.{i}.mlp.dense_h_to_4h", "layers.{i}.mlp.dense_4h_to_h")
    out += _norm("layers.{i}.input_layernorm", "ln1", cfg)
    out += _norm("layers.{i}.post_attention_layernorm", "ln2", cfg)
    out += _norm("final_layer_norm", "final_norm", cfg, False) + _head(cfg, "embed_out")
    return out


def _gptj(cfg: ModelConfig) -> list[HFTensor]:
    D, V = cfg.d_model, cfg.vocab_size
    out = [_R("wte.weight", (V, D), ("embed",), (V, D), False)]
    out += _separate_attn(cfg, "h.{i}.attn", ("q_proj", "k_proj", "v_proj", "out_proj"))
    out += _mlp_linear(cfg, "h.{i}.mlp.fc_in", "h.{i}.mlp.fc_out")
    out += _norm("h.{i}.ln_1", "ln1", cfg) + _norm("ln_f", "final_norm", cfg, False)
    return out + _head(cfg, "lm_head")


def _qk_norm(cfg: ModelConfig, pre: str) -> list[HFTensor]:
    """Per-head q/k RMSNorm weights [Dh] (Qwen3, Gemma 3)."""
    if not cfg.qk_norm:
        return []
    Dh = cfg.head_dim
    return [_R(f"{pre}.q_norm.weight", (Dh,), ("attn", "q_norm", "scale"), (Dh,)),
            _R(f"{pre}.k_norm.weight", (Dh,), ("attn", "k_norm", "scale"), (Dh,))]


def _llama_norms(cfg: ModelConfig) -> list[HFTensor]:
    out = _norm("layers.{i}.input_layernorm", "ln1", cfg)
    if cfg.post_norms:  # Gemma 2/3 names
        return out + (_norm("layers.{i}.post_attention_layernorm", "post_attn_norm", cfg)
                      + _norm("layers.{i}.pre_feedforward_layernorm", "ln2", cfg)
                      + _norm("layers.{i}.post_feedforward_layernorm", "post_mlp_norm", cfg))
    return out + _norm("layers.{i}.post_attention_layernorm", "ln2", cfg)


def _llama(cfg: ModelConfig) -> list[HFTensor]:
    """Llama, Mistral, Qwen2, Qwen3 and Gemma 2/3 (the switches add their tensors)."""
    D, V = cfg.d_model, cfg.vocab_size
    out = [_R("embed_tokens.weight", (V, D), ("embed",), (V, D), False)]
    out += _separate_attn(cfg, "layers.{i}.self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"))
    out += _qk_norm(cfg, "layers.{i}.self_attn")
    out += _mlp_linear(cfg, "layers.{i}.mlp.up_proj", "layers.{i}.mlp.down_proj",
                       "layers.{i}.mlp.gate_proj")
    out += _llama_norms(cfg)
    return out + _norm("norm", "final_norm", cfg, False) + _head(cfg, "lm_head")


def _phi3(cfg: ModelConfig) -> list[HFTensor]:
    """Phi-3: Llama's computation with fused qkv_proj and gate_up_proj tensors."""
    D, N, K, Dh, F, V = (cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_ff,
                         cfg.vocab_size)
    if cfg.qkv_bias or cfg.attn_out_bias or cfg.mlp_bias:
        raise ValueError("phi3 checkpoints have no biases; set qkv_bias, attn_out_bias and "
                         "mlp_bias False")
    a, m = "layers.{i}.self_attn", "layers.{i}.mlp"
    cuts = [N * Dh, (N + K) * Dh]
    out = [_R("embed_tokens.weight", (V, D), ("embed",), (V, D), False),
           HFTensor(f"{a}.qkv_proj.weight", ((N + 2 * K) * Dh, D),
                    (("attn", "q"), ("attn", "k"), ("attn", "v")),
                    lambda w: [p.T.reshape(D, -1, Dh) for p in np.split(w, cuts)],
                    lambda o: np.concatenate([p.reshape(D, -1).T for p in o]), True),
           _T(f"{a}.o_proj.weight", (D, N * Dh), ("attn", "o"), (N, Dh, D)),
           HFTensor(f"{m}.gate_up_proj.weight", (2 * F, D), (("mlp", "gate"), ("mlp", "up")),
                    lambda w: [p.T for p in np.split(w, 2)],
                    lambda o: np.concatenate([p.T for p in o]), True),
           _T(f"{m}.down_proj.weight", (D, F), ("mlp", "down"), (F, D))]
    out += _llama_norms(cfg)
    return out + _norm("norm", "final_norm", cfg, False) + _head(cfg, "lm_head")


def _experts(cfg: ModelConfig, pre: str, names: tuple[str, str, str]) -> list[HFTensor]:
    """Per-expert gate, up and down Linear weights `{pre}.{e}.<name>.weight` (in that order)."""
    D, F, E = cfg.d_model, cfg.moe_d_ff, cfg.n_experts
    gate, up, down = (f"{pre}.{{e}}.{n}.weight" for n in names)
    return [dataclasses.replace(_T(gate, (F, D), ("mlp", "gate"), (D, F)), experts=E),
            dataclasses.replace(_T(up, (F, D), ("mlp", "up"), (D, F)), experts=E),
            dataclasses.replace(_T(down, (D, F), ("mlp", "down"), (F, D)), experts=E)]


def _router(cfg: ModelConfig, name: str) -> HFTensor:
    return _T(name, (cfg.n_experts, cfg.d_model), ("mlp", "router"), (cfg.d_model, cfg.n_experts))


def _mixtral(cfg: ModelConfig) -> list[HFTensor]:
    """Mixtral: Llama's attention and norms, `block_sparse_moe` experts w1 (gate), w3 (up),
    w2 (down) and its router."""
    D, V = cfg.d_model, cfg.vocab_size
    m = "layers.{i}.block_sparse_moe"
    out = [_R("embed_tokens.weight", (V, D), ("embed",), (V, D), False)]
    out += _separate_attn(cfg, "layers.{i}.self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"))
    out += [_router(cfg, f"{m}.gate.weight")] + _experts(cfg, f"{m}.experts", ("w1", "w3", "w2"))
    out += _llama_norms(cfg)
    return out + _norm("norm", "final_norm", cfg, False) + _head(cfg, "lm_head")


def _qwen2_moe(cfg: ModelConfig) -> list[HFTensor]:
    """Qwen2-MoE: Qwen2's attention (q/k/v biases), experts, router, shared expert and its
    sigmoid gate `shared_expert_gate` [1, D] (ours [D]). Qwen3-MoE: the same names with Qwen3's
    q/k norms and no shared expert."""
    D, V, S = cfg.d_model, cfg.vocab_size, cfg.shared_expert_d_ff
    m = "layers.{i}.mlp"
    out = [_R("embed_tokens.weight", (V, D), ("embed",), (V, D), False)]
    out += _separate_attn(cfg, "layers.{i}.self_attn", ("q_proj", "k_proj", "v_proj", "o_proj"))
    out += _qk_norm(cfg, "layers.{i}.self_attn")
    out += [_router(cfg, f"{m}.gate.weight")]
    out += _experts(cfg, f"{m}.experts", ("gate_proj", "up_proj", "down_proj"))
    if S:
        sh = f"{m}.shared_expert"
        out += [_T(f"{sh}.gate_proj.weight", (S, D), ("mlp", "shared", "gate"), (D, S)),
                _T(f"{sh}.up_proj.weight", (S, D), ("mlp", "shared", "up"), (D, S)),
                _T(f"{sh}.down_proj.weight", (D, S), ("mlp", "shared", "down"), (S, D)),
                _T(f"{m}.shared_expert_gate.weight", (1, D), ("mlp", "shared_gate"), (D,))]
    out += _llama_norms(cfg)
    return out + _norm("norm", "final_norm", cfg, False) + _head(cfg, "lm_head")


# (tensor list builder, prefixes of the body in HF checkpoints: first one is used on export).
# The LM head of every family lives outside the body prefix.
FAMILY_MAPS = {
    "gpt2": (_gpt2, ("transformer.", "")),
    "neox": (_neox, ("gpt_neox.", "")),
    "gptj": (_gptj, ("transformer.", "")),
    "llama": (_llama, ("model.", "")),
    "qwen3": (_llama, ("model.", "")),
    "gemma2": (_llama, ("model.", "")),
    "gemma3": (_llama, ("model.", "")),
    "phi3": (_phi3, ("model.", "")),
    "mixtral": (_mixtral, ("model.", "")),
    "qwen2_moe": (_qwen2_moe, ("model.", "")),
    "qwen3_moe": (_qwen2_moe, ("model.", "")),
}
HEAD_NAMES = ("lm_head.weight", "lm_head.bias", "embed_out.weight")


def tensor_specs(cfg: ModelConfig) -> list[HFTensor]:
    return FAMILY_MAPS[cfg.family][0](cfg)


def full_name(t_name: str, prefix: str, layer: int | None = None,
              expert: int | None = None) -> str:
    name = t_name.format(i=layer, e=expert) if layer is not None else t_name
    return name if name in HEAD_NAMES else prefix + name


def slice_through(t: HFTensor, ours_shape: tuple, index: tuple
                  ) -> tuple[tuple, tuple, tuple] | None:
    """For a T/R tensor: (HF slice to read, shape to reshape it to after the transpose, residual
    index to apply then) that yields ours[index] (basic slices over one layer's shape);
    None -> read the tensor whole.

    Each HF dim is the product of consecutive dims of ours (in transposed order for T); a slice
    of the leading dim of such a group with the rest full is a contiguous HF range."""
    if t.layout not in ("T", "R"):
        return None
    dims = t.shape[::-1] if t.layout == "T" else t.shape
    hf_index, block, residual, k = [], [], [], 0
    for d in dims:
        start, size = k, 1
        while size < d and k < len(ours_shape):
            size *= ours_shape[k]
            k += 1
        if size != d or k == start:
            return None
        sub, sl = ours_shape[start:k], index[start:k]
        ranges = [x.indices(n) for x, n in zip(sl, sub)]
        if any(r[2] != 1 for r in ranges):
            return None
        if all(r[:2] == (0, n) for r, n in zip(ranges[1:], sub[1:])):
            inner = int(np.prod(sub[1:], dtype=np.int64))
            hf_index.append(slice(ranges[0][0] * inner, ranges[0][1] * inner))
            block += [ranges[0][1] - ranges[0][0], *sub[1:]]
            residual += [slice(None)] * len(sub)
        else:
            hf_index.append(slice(None))
            block += list(sub)
            residual += list(sl)
    if k != len(ours_shape):
        return None
    hf_index = hf_index[::-1] if t.layout == "T" else hf_index
    return tuple(hf_index), tuple(block), tuple(residual)
