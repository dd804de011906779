"""ModelConfig: one frozen dataclass whose named switches select GPT-2, GPT-NeoX, GPT-J, the
Llama family (Llama 2/3, Mistral, Qwen2), Qwen3, Gemma 2, Gemma 3, Phi-3, or the
mixture-of-experts Mixtral, Qwen2-MoE and Qwen3-MoE.

Why one decoder with switches rather than one model class per family: the DPO trainer, sharding
rules, checkpointing and the HF importer all see the same parameter tree layout; the families
only differ in a handful of well-understood places (norm, MLP, position encoding, residual
wiring, biases, head tying, attention window, soft-capping, mixture-of-experts MLP), and each
difference is a field here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

# The family chooses the HF tensor-name map and the model_type written on export; every
# difference in the computation is a separate switch below.
FAMILIES = ("gpt2", "neox", "gptj", "llama", "qwen3", "gemma2", "gemma3", "phi3", "mixtral",
            "qwen2_moe", "qwen3_moe")
LAYER_TYPES = ("full", "sliding")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and architectural switches of a decoder-only transformer.

    `n_kv_head` None -> n_head (multi-head); `head_dim` None -> d_model // n_head;
    `rotary_dim` None -> head_dim (all of each head is rotated). These are resolved in
    `__post_init__`, so a constructed config always holds concrete ints.
    """

    family: str = "gpt2"  # HF name map and export model_type (FAMILIES)
    vocab_size: int = 50257
    n_layer: int = 12
    d_model: int = 768
    n_head: int = 12
    n_kv_head: int | None = None  # grouped-query attention when < n_head
    head_dim: int | None = None
    d_ff: int = 3072
    max_len: int = 1024  # learned position table size / documented context length
    # normalisation
    norm: str = "layernorm"  # layernorm (scale+bias) | rmsnorm (scale only)
    norm_eps: float = 1e-5
    norm_unit_offset: bool = False  # scale is (1 + w), w initialised at 0 (Gemma RMSNorm)
    post_norms: bool = False  # norm the attention / MLP output before its residual add (Gemma)
    qk_norm: bool = False  # RMSNorm over head_dim of each query and key head before rotary
    # MLP
    activation: str = "gelu_tanh"  # gelu_tanh | gelu (erf) | silu | relu
    gated_mlp: bool = False  # SwiGLU-style: down(act(gate(x)) * up(x))
    # mixture of experts (models/moe.py): n_experts > 0 replaces the MLP of every layer
    n_experts: int = 0  # experts per layer (0: the dense MLP)
    n_experts_per_tok: int = 2  # top-k experts each token is sent to
    moe_d_ff: int | None = None  # hidden width of each expert (None: d_ff)
    moe_renormalize: bool = True  # top-k weights divided by their sum (Mixtral; Qwen2-MoE's
    # norm_topk_prob); False: the top-k softmax probabilities as they are
    shared_expert_d_ff: int = 0  # > 0: a gated MLP of this width on every token, times
    # sigmoid(x . shared_gate) (Qwen2-MoE's shared expert)
    moe_impl: str = "sparse"  # sparse (dropless grouped dispatch) | dense (reference)
    moe_kernel: str | None = None  # sparse's grouped matmul: ragged_dot | tiled | None (by
    # backend: tiled on CPU, ragged_dot on TPU / GPU; models/moe_dispatch.py)
    moe_tile: int = 128  # rows per tile of the tiled kernel
    moe_expert_axis: str | None = None  # expert parallelism: the mesh axis (data | fsdp |
    # tensor) the experts are split over, tokens exchanged by all_to_all (models/moe_parallel.py)
    # when the trace runs under a `jax.set_mesh` whose axis has > 1 device; None: no exchange
    router_aux_loss_coef: float = 0.0  # the router loss weight the checkpoint declares
    # (config.json, else transformers' class default); loss.router_aux_loss_coef=None uses it
    # positions
    position: str = "learned"  # learned | rotary
    rotary_dim: int | None = None  # per-head dims that are rotated (NeoX rotary_pct * head_dim)
    rotary_style: str = "half"  # half (NeoX/Llama rotate_half) | interleaved (GPT-J every-two)
    rope_theta: float = 10000.0
    rope_scaling: str | None = None  # None | linear | llama3 | longrope
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_len: int = 8192  # llama3, longrope (pretraining context length)
    # longrope (Phi-3 su / longrope): per-frequency divisors [rotary_dim / 2], the long ones when
    # a forward's largest position + 1 exceeds rope_original_max_len; sin and cos times
    # rope_attention_factor (None: sqrt(1 + ln(max_len / original) / ln(original)), 1 if <= 1)
    rope_short_factor: tuple[float, ...] | None = None
    rope_long_factor: tuple[float, ...] | None = None
    rope_attention_factor: float | None = None
    local_rope_theta: float | None = None  # sliding layers: unscaled rope of this base (Gemma 3)
    # attention
    sliding_window: int | None = None  # query i sees key j only when i - j < sliding_window
    layer_types: tuple[str, ...] | None = None  # per layer 'full' | 'sliding' (None: all one)
    query_pre_attn_scalar: float | None = None  # scores * this**-0.5 (None: head_dim**-0.5)
    attn_logit_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap) (Gemma 2)
    embed_scale: bool = False  # input embeddings * sqrt(d_model) (Gemma)
    # residual wiring
    parallel_residual: bool = False  # x + attn(ln1 x) + mlp(ln2 x)   (NeoX, GPT-J)
    shared_norm: bool = False  # parallel block uses ONE norm for attn and mlp (GPT-J)
    # head and biases
    tie_embeddings: bool = True
    qkv_bias: bool = True
    attn_out_bias: bool = True
    mlp_bias: bool = True
    lm_head_bias: bool = False  # GPT-J
    # numerics / execution
    dtype: str = "float32"  # compute dtype (activations, matmul inputs)
    param_dtype: str = "float32"  # storage dtype of parameters
    remat: str = "none"  # none | full | dots_saveable | dots_no_batch (per layer)
    attention_impl: str | None = None  # None (XLA) | cudnn | chunked (query blocks, remat)
    attention_chunk: int = 512  # query rows per block for attention_impl='chunked'
    # chunked: query x key blocks, skipping the pairs the mask metadata leave empty (exact;
    # opt-in: slower than plain query blocks on CPU, experiments/bench/README.md)
    attention_skip_blocks: bool = False
    scan_layers: bool = True  # lax.scan over stacked layers: compile time independent of depth
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.n_kv_head is None:
            object.__setattr__(self, "n_kv_head", self.n_head)
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ValueError(f"d_model {self.d_model} not divisible by n_head {self.n_head}")
            object.__setattr__(self, "head_dim", self.d_model // self.n_head)
        if self.rotary_dim is None:
            object.__setattr__(self, "rotary_dim", self.head_dim)
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} not a multiple of n_kv_head {self.n_kv_head}")
        checks = {
            "norm": ("layernorm", "rmsnorm"),
            "activation": ("gelu_tanh", "gelu", "silu", "relu"),
            "position": ("learned", "rotary"),
            "rotary_style": ("half", "interleaved"),
            "rope_scaling": (None, "linear", "llama3", "longrope"),
            "remat": ("none", "full", "dots_saveable", "dots_no_batch"),
            "attention_impl": (None, "xla", "cudnn", "chunked"),
            "dtype": ("float32", "bfloat16", "float16"),
            "param_dtype": ("float32", "bfloat16", "float16"),
        }
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.attention_chunk < 1:
            raise ValueError(f"attention_chunk must be >= 1, got {self.attention_chunk}")
        if self.position == "rotary" and (self.rotary_dim % 2 or self.rotary_dim > self.head_dim):
            raise ValueError(f"rotary_dim {self.rotary_dim} must be even and <= head_dim")
        if self.shared_norm and not self.parallel_residual:
            raise ValueError("shared_norm only makes sense with parallel_residual")
        if self.post_norms and self.parallel_residual:
            raise ValueError("post_norms is a sequential-residual switch (Gemma); "
                             "parallel_residual must be False")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be None or >= 1, got {self.sliding_window}")
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.n_layer or not set(self.layer_types) <= set(
                    LAYER_TYPES):
                raise ValueError(f"layer_types must hold n_layer={self.n_layer} entries of "
                                 f"{LAYER_TYPES}, got {self.layer_types}")
            if "sliding" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has 'sliding' layers but sliding_window is None")
            if set(self.layer_types) == {"sliding"}:  # canonical form of "every layer slides"
                object.__setattr__(self, "layer_types", None)
        if self.local_rope_theta is not None and self.position != "rotary":
            raise ValueError("local_rope_theta needs position='rotary'")
        if self.attn_logit_softcap is not None and self.attention_impl == "cudnn":
            raise ValueError("attn_logit_softcap is not available with attention_impl='cudnn'; "
                             "use None (XLA) or 'chunked'")
        for name in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be None or > 0, got {value}")
        self._check_moe()
        self._check_longrope()

    def _check_moe(self) -> None:
        if self.moe_d_ff is None and self.n_experts:
            object.__setattr__(self, "moe_d_ff", self.d_ff)
        if self.n_experts < 0 or self.shared_expert_d_ff < 0:
            raise ValueError(f"n_experts ({self.n_experts}) and shared_expert_d_ff "
                             f"({self.shared_expert_d_ff}) must be >= 0")
        if not self.n_experts:
            if self.shared_expert_d_ff or self.router_aux_loss_coef:
                raise ValueError("shared_expert_d_ff and router_aux_loss_coef need n_experts > 0")
            return
        if not self.router_aux_loss_coef >= 0:
            raise ValueError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        if self.moe_impl not in ("sparse", "dense") or self.moe_kernel not in (
                None, "ragged_dot", "tiled") or self.moe_tile < 1:
            raise ValueError(f"moe_impl must be 'sparse' or 'dense' (got {self.moe_impl!r}), "
                             f"moe_kernel None, 'ragged_dot' or 'tiled' (got "
                             f"{self.moe_kernel!r}), moe_tile >= 1 (got {self.moe_tile})")
        if self.moe_expert_axis not in (None, "data", "fsdp", "tensor") or (
                self.moe_expert_axis and self.moe_impl != "sparse"):
            raise ValueError(f"moe_expert_axis must be None or a mesh axis 'data', 'fsdp', "
                             f"'tensor' (got {self.moe_expert_axis!r}) and needs moe_impl "
                             f"'sparse' (got {self.moe_impl!r})")
        if not 1 <= self.n_experts_per_tok <= self.n_experts:
            raise ValueError(f"n_experts_per_tok must be in [1, n_experts={self.n_experts}], "
                             f"got {self.n_experts_per_tok}")
        if not self.gated_mlp or self.mlp_bias:
            raise ValueError("mixture-of-experts layers are gated MLPs without biases: set "
                             "gated_mlp=True and mlp_bias=False")

    def _check_longrope(self) -> None:
        factors = (self.rope_short_factor, self.rope_long_factor)
        if self.rope_scaling != "longrope":
            if factors != (None, None) or self.rope_attention_factor is not None:
                raise ValueError("rope_short_factor, rope_long_factor and rope_attention_factor "
                                 "are longrope fields; set rope_scaling='longrope' or leave them "
                                 "None")
            return
        half = self.rotary_dim // 2
        for name in ("rope_short_factor", "rope_long_factor"):
            value = getattr(self, name)
            if value is None or len(value) != half:
                raise ValueError(f"rope_scaling='longrope' needs {name} of rotary_dim / 2 = "
                                 f"{half} floats, got {value!r}")
            object.__setattr__(self, name, tuple(float(x) for x in value))
        if self.rope_attention_factor is None:
            factor = self.max_len / self.rope_original_max_len
            object.__setattr__(self, "rope_attention_factor", 1.0 if factor <= 1.0 else math.sqrt(
                1 + math.log(factor) / math.log(self.rope_original_max_len)))

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        """Per layer: does it attend through the sliding window? (layer_types None: every layer
        when sliding_window is set, else none.)"""
        if self.layer_types is None:
            return (self.sliding_window is not None,) * self.n_layer
        return tuple(t == "sliding" for t in self.layer_types)


def _tiny(**kw: Any) -> dict:
    base = dict(vocab_size=128, n_layer=2, d_model=32, n_head=4, d_ff=64, max_len=64)
    base.update(kw)
    return base


_GPT2 = dict(family="gpt2", vocab_size=50257, max_len=1024, norm="layernorm",
             activation="gelu_tanh", position="learned", tie_embeddings=True)
_NEOX = dict(family="neox", norm="layernorm", activation="gelu", position="rotary",
             rotary_style="half", parallel_residual=True, tie_embeddings=False, max_len=2048)
_GPTJ = dict(family="gptj", norm="layernorm", activation="gelu_tanh", position="rotary",
             rotary_style="interleaved", parallel_residual=True, shared_norm=True,
             tie_embeddings=False, qkv_bias=False, attn_out_bias=False, lm_head_bias=True,
             max_len=2048)
_LLAMA = dict(family="llama", norm="rmsnorm", activation="silu", gated_mlp=True,
              position="rotary", rotary_style="half", qkv_bias=False, attn_out_bias=False,
              mlp_bias=False, tie_embeddings=False)
_QWEN3 = dict(_LLAMA, family="qwen3", qk_norm=True, vocab_size=151936, head_dim=128,
              max_len=40960, norm_eps=1e-6, rope_theta=1000000.0)
_GEMMA = dict(_LLAMA, activation="gelu_tanh", norm_eps=1e-6, norm_unit_offset=True,
              post_norms=True, embed_scale=True, tie_embeddings=True, head_dim=256,
              query_pre_attn_scalar=256.0)
_GEMMA2 = dict(_GEMMA, family="gemma2", attn_logit_softcap=50.0, final_logit_softcap=30.0,
               sliding_window=4096)
_GEMMA3 = dict(_GEMMA, family="gemma3", qk_norm=True, rope_theta=1000000.0,
               local_rope_theta=10000.0)
_PHI3 = dict(_LLAMA, family="phi3")
_MIXTRAL = dict(_LLAMA, family="mixtral", n_experts=8, n_experts_per_tok=2, rope_theta=1e6,
                norm_eps=1e-5, router_aux_loss_coef=0.02)  # Mixtral-8x7B's config.json
_QWEN2_MOE = dict(_LLAMA, family="qwen2_moe", qkv_bias=True, moe_renormalize=False,
                  norm_eps=1e-6, router_aux_loss_coef=0.001)
_QWEN3_MOE = dict(_QWEN3, family="qwen3_moe", moe_renormalize=True, router_aux_loss_coef=0.001)


def _alternate(n_layer: int, every: int) -> tuple[str, ...]:
    """Gemma's layer pattern: every `every`-th layer full, the others sliding."""
    return tuple("full" if (i + 1) % every == 0 else "sliding" for i in range(n_layer))


_LLAMA3_ROPE = dict(rope_theta=500000.0, rope_scaling="llama3", rope_low_freq_factor=1.0,
                    rope_high_freq_factor=4.0, rope_original_max_len=8192)

# Shapes from the public config.json of each checkpoint.
PRESETS: dict[str, dict] = {
    "tiny-gpt2": _tiny(**{**_GPT2, "vocab_size": 128, "max_len": 64}),
    "tiny-neox": _tiny(**{**_NEOX, "max_len": 64}, d_model=64, rotary_dim=4),
    "tiny-gptj": _tiny(**{**_GPTJ, "max_len": 64}, d_model=64, rotary_dim=8),
    "tiny-llama": _tiny(**_LLAMA, n_kv_head=2, norm_eps=1e-5,
                        **{**_LLAMA3_ROPE, "rope_factor": 8.0, "rope_original_max_len": 32}),
    # Every new switch at once: sliding + full layers with their own rope, q/k norm, (1 + w)
    # norms, post norms, embedding scale, query_pre_attn_scalar, both soft-caps.
    "tiny-gemma": _tiny(**{**_GEMMA3, "max_len": 64, "head_dim": 16,
                           "query_pre_attn_scalar": 12.0}, n_kv_head=2, sliding_window=4,
                        layer_types=("sliding", "full"), attn_logit_softcap=5.0,
                        final_logit_softcap=3.0, rope_scaling="linear", rope_factor=2.0),
    # The offline default's model: GPT-2 layout sized for the synthetic task (128-token vocab).
    "gpt2-synthetic": dict(_GPT2, vocab_size=128, max_len=64, n_layer=2, d_model=128, n_head=4,
                           d_ff=512),
    "gpt2": dict(_GPT2, n_layer=12, d_model=768, n_head=12, d_ff=3072),
    "gpt2-medium": dict(_GPT2, n_layer=24, d_model=1024, n_head=16, d_ff=4096),
    "gpt2-large": dict(_GPT2, n_layer=36, d_model=1280, n_head=20, d_ff=5120),
    "gpt2-xl": dict(_GPT2, n_layer=48, d_model=1600, n_head=25, d_ff=6400),
    "pythia-1.4b": dict(_NEOX, vocab_size=50304, n_layer=24, d_model=2048, n_head=16,
                        d_ff=8192, rotary_dim=32),  # rotary_pct 0.25 of head_dim 128
    "pythia-2.8b": dict(_NEOX, vocab_size=50304, n_layer=32, d_model=2560, n_head=32,
                        d_ff=10240, rotary_dim=20),  # rotary_pct 0.25 of head_dim 80
    "gpt-j-6b": dict(_GPTJ, vocab_size=50400, n_layer=28, d_model=4096, n_head=16,
                     d_ff=16384, rotary_dim=64),
    "llama-3.2-1b": dict(_LLAMA, **_LLAMA3_ROPE, rope_factor=32.0, vocab_size=128256,
                         n_layer=16, d_model=2048, n_head=32, n_kv_head=8, head_dim=64,
                         d_ff=8192, max_len=131072, norm_eps=1e-5, tie_embeddings=True),
    "llama-3.1-8b": dict(_LLAMA, **_LLAMA3_ROPE, rope_factor=8.0, vocab_size=128256,
                         n_layer=32, d_model=4096, n_head=32, n_kv_head=8, d_ff=14336,
                         max_len=131072, norm_eps=1e-5),
    "mistral-7b": dict(_LLAMA, family="llama", vocab_size=32000, n_layer=32, d_model=4096,
                       n_head=32, n_kv_head=8, d_ff=14336, max_len=32768, norm_eps=1e-5,
                       sliding_window=4096),  # v0.1
    "qwen2.5-0.5b": dict(_LLAMA, vocab_size=151936, n_layer=24, d_model=896, n_head=14,
                         n_kv_head=2, d_ff=4864, max_len=32768, norm_eps=1e-6,
                         rope_theta=1000000.0, qkv_bias=True, tie_embeddings=True),
    "qwen2.5-7b": dict(_LLAMA, vocab_size=152064, n_layer=28, d_model=3584, n_head=28,
                       n_kv_head=4, d_ff=18944, max_len=32768, norm_eps=1e-6,
                       rope_theta=1000000.0, qkv_bias=True, tie_embeddings=False),
    "qwen3-0.6b": dict(_QWEN3, n_layer=28, d_model=1024, n_head=16, n_kv_head=8, d_ff=3072,
                       tie_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3, n_layer=28, d_model=2048, n_head=16, n_kv_head=8, d_ff=6144,
                       tie_embeddings=True),
    "qwen3-8b": dict(_QWEN3, n_layer=36, d_model=4096, n_head=32, n_kv_head=8, d_ff=12288,
                     tie_embeddings=False),
    "gemma-2-2b": dict(_GEMMA2, vocab_size=256000, n_layer=26, d_model=2304, n_head=8,
                       n_kv_head=4, d_ff=9216, max_len=8192, layer_types=_alternate(26, 2)),
    "gemma-3-1b": dict(_GEMMA3, vocab_size=262144, n_layer=26, d_model=1152, n_head=4,
                       n_kv_head=1, d_ff=6912, max_len=32768, sliding_window=512,
                       layer_types=_alternate(26, 6)),
    # The text decoder of the multimodal Gemma-3-4B (rope linear x8 on the full layers).
    "gemma-3-4b": dict(_GEMMA3, vocab_size=262208, n_layer=34, d_model=2560, n_head=8,
                       n_kv_head=4, d_ff=10240, max_len=131072, sliding_window=1024,
                       layer_types=_alternate(34, 6), rope_scaling="linear", rope_factor=8.0),
    "phi-3-mini": dict(_PHI3, vocab_size=32064, n_layer=32, d_model=3072, n_head=32,
                       d_ff=8192, max_len=4096, norm_eps=1e-5, sliding_window=2047),  # 4k
    "mixtral-8x7b": dict(_MIXTRAL, vocab_size=32000, n_layer=32, d_model=4096, n_head=32,
                         n_kv_head=8, d_ff=14336, max_len=32768),  # v0.1
    "qwen1.5-moe-a2.7b": dict(_QWEN2_MOE, vocab_size=151936, n_layer=24, d_model=2048,
                              n_head=16, n_kv_head=16, d_ff=5632, max_len=8192,
                              rope_theta=1e6, n_experts=60, n_experts_per_tok=4, moe_d_ff=1408,
                              shared_expert_d_ff=5632, tie_embeddings=False),
    "qwen3-30b-a3b": dict(_QWEN3_MOE, n_layer=48, d_model=2048, n_head=32, n_kv_head=4,
                          d_ff=6144, n_experts=128, n_experts_per_tok=8, moe_d_ff=768,
                          tie_embeddings=False),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named shape (tiny test shapes or public checkpoints) with field overrides."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


def _layer_matmul_params(cfg: ModelConfig, active: bool = False) -> int:
    """Matmul weights of one layer; with experts, all of them (active=False) or those one token
    runs through (active=True: the router, n_experts_per_tok experts and the shared expert)."""
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_head * hd * 2 + d * cfg.n_kv_head * hd * 2  # q, o, k, v
    if not cfg.n_experts:
        return attn + d * cfg.d_ff * (3 if cfg.gated_mlp else 2)
    experts = cfg.n_experts_per_tok if active else cfg.n_experts
    shared = 3 * d * cfg.shared_expert_d_ff + (d if cfg.shared_expert_d_ff else 0)
    return attn + d * cfg.n_experts + experts * 3 * d * cfg.moe_d_ff + shared


def param_count(cfg: ModelConfig) -> int:
    """Exact number of parameters of the tree `Model(cfg).init` builds (tied head counted once)."""
    d, hd, L = cfg.d_model, cfg.head_dim, cfg.n_layer
    norm = d * (2 if cfg.norm == "layernorm" else 1)
    layer = _layer_matmul_params(cfg)
    if cfg.qkv_bias:
        layer += (cfg.n_head + 2 * cfg.n_kv_head) * hd
    if cfg.attn_out_bias:
        layer += d
    if cfg.mlp_bias and not cfg.n_experts:
        layer += cfg.d_ff * (2 if cfg.gated_mlp else 1) + d
    layer += norm * (1 if cfg.shared_norm else 2) + (2 * norm if cfg.post_norms else 0)
    if cfg.qk_norm:
        layer += 2 * hd
    n = L * layer + norm + cfg.vocab_size * d
    if cfg.position == "learned":
        n += cfg.max_len * d
    if not cfg.tie_embeddings:
        n += cfg.vocab_size * d
    if cfg.lm_head_bias:
        n += cfg.vocab_size
    return n


def matmul_param_count(cfg: ModelConfig) -> int:
    """N of the FLOPs convention: all matmul weights incl. the LM head, excluding input embedding
    lookup (a gather, no FLOPs), position table, norms and biases. With experts, the weights one
    token runs through (router, top-k experts, shared expert): the FLOPs of sparse routing, not
    of the dense dispatch models/moe.py computes (n_experts / n_experts_per_tok times the
    experts' share)."""
    return cfg.n_layer * _layer_matmul_params(cfg, active=True) + cfg.vocab_size * cfg.d_model


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training (forward + backward) FLOPs per token: 6 N + 12 L (n_head*head_dim) T.

    6N: 2 FLOPs per multiply-add forward, twice that backward. 12 L d T: the two attention
    matmuls (QK^T and PV) at full (non-causal) cost, forward + backward. Same convention as
    Kaplan et al. / PaLM MFU, so MFU numbers are comparable with the literature.
    """
    return 6 * matmul_param_count(cfg) + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len
