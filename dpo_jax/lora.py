"""LoRA (Hu et al. 2021, *LoRA: Low-Rank Adaptation of Large Language Models*): a policy that
is a frozen base plus trained low-rank adapters, whose reference is the starting policy, as
DPO's objective has it: one copy of the base weights serves both forwards.

The reference (``model.lora.reference``):
  * ``'policy'`` (default): the policy the run starts from. With seeded adapters (``B = 0``)
    that is the base alone; with initial adapters from ``model.lora.path`` (a PEFT directory,
    e.g. an SFT run's) it is the base with those adapters, held as a frozen copy beside the
    base (``ref_params = {**base, 'lora': initial adapters}``: adapter-sized, never a merged
    copy of the base), so step 1's loss is ln 2 and its rewards 0. A LoRA run given as
    ``init.policy`` has its adapters merged into this run's base (``state.run_params``), so
    there too the base is the starting policy.
  * ``'base'``: the base with every adapter off, also when ``model.lora.path`` gives initial
    adapters (TRL's behaviour for a PEFT model without ``ref_adapter_name`` or a reference
    model): the objective then measures the policy against the base, not the start.

At each targeted projection ``y = x @ W`` the adapted model computes
``y = x @ W + (alpha / rank) * dropout(x) @ A @ B`` (``W + A @ B`` is never formed in a training
step), except at an adapted LM head (target ``lm_head``, off by default): the chunked log-prob
head reads one ``[V, D]`` matrix, so ``W + scale * (A @ B)^T`` is formed there (the size of
the head, no dropout); on a model whose head is tied to the input embedding, the adapter acts
on the head's side only. ``A`` starts Kaiming-uniform (PEFT's default) or Gaussian (std
``1/rank``), ``B`` at zero, so step 0 is the base exactly.

Parameter trees (ARCHITECTURE.md: plain nested dicts):
  * the base: ``Model.init``'s tree, frozen (no gradient, no optimizer state), in
    ``model.param_dtype`` (bfloat16 halves it);
  * the adapters: ``{'lora': {target: {'a': A, 'b': B}}}`` in float32, trained. For a layer
    projection with base weight ``[layers, *in, *out]``: ``A [layers, *in, r]``, ``B [layers,
    r, *out]``, each with its base weight's logical axes and the rank axis unsharded; the LM
    head (``[V, D]``): ``A [D, r]``, ``B [r, V]``;
  * the policy's tree in a forward: :func:`join` of the two (``{**base, 'lora': ...}``, the
    trained adapters replacing any frozen ones of the reference).
    :class:`LoraModel` runs it with the adapters attached at their projections; a tree without
    ``'lora'`` runs the base alone.

``model.lora.base_quant`` ('int8', 'nf4': QLoRA) holds the base's projections quantised
(``dpo_jax/models/quant.py``; :meth:`LoraModel.quantize_base`), dequantised inside each matmul;
the reference is then the quantised base. A train state's ``trainable`` are the adapters and
``frozen.lora_base`` the base; checkpoints hold the adapters, their optimizer state and the
base's fingerprint (``dpo_jax/lora_base.py``); PEFT directories: ``dpo_jax/lora_peft.py``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dpo_jax.models import Model, ModelConfig, decoder, project, quant

ATTENTION = ("q", "k", "v", "o")
MLP = ("up", "gate", "down")
HEAD = "lm_head"
INITS = ("kaiming", "gaussian")
REFERENCES = ("policy", "base")
_get = quant.get_path  # tree[path[0]][path[1]]..., or None


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """The ``model.lora`` block (field meanings: ``dpo_jax/config.py``)."""

    rank: int = 0  # 0 = off (full fine-tuning)
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("all",)
    init: str = "kaiming"
    path: str = ""  # a PEFT adapter directory as the initial adapters
    seed: int = 0  # A's init and the dropout masks
    reference: str = "policy"  # 'policy': base + initial adapters (frozen); 'base': adapters off
    base_quant: str = "none"  # the frozen base's projections: 'none', 'int8', 'nf4' (QLoRA)
    quant_embedding: bool = False  # with base_quant: an untied input embedding too

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def read_lora(block, seed: int = 0) -> LoraConfig:
    """:class:`LoraConfig` of a config's ``model.lora`` block (None: off). Raises ValueError for
    a negative rank, an unknown init or a dropout outside [0, 1)."""
    if block is None:
        return LoraConfig(seed=seed)
    targets = block.targets
    targets = tuple(t.strip() for t in (targets.split(",") if isinstance(targets, str)
                                        else targets) if t.strip())
    cfg = LoraConfig(rank=int(block.rank), alpha=float(block.alpha), dropout=float(block.dropout),
                     targets=targets, init=str(block.init), path=str(block.path or ""),
                     seed=int(seed), reference=str(block.get("reference", "policy")),
                     base_quant=str(block.get("base_quant", "none") or "none"),
                     quant_embedding=bool(block.get("quant_embedding", False)))
    quant.check_settings(cfg.base_quant, cfg.quant_embedding, cfg.rank)
    if cfg.rank < 0:
        raise ValueError(f"model.lora.rank={cfg.rank}: must be >= 0 (0 = full fine-tuning)")
    if cfg.init not in INITS:
        raise ValueError(f"model.lora.init={cfg.init!r}: expected one of {INITS}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"model.lora.dropout={cfg.dropout}: must be in [0, 1)")
    if cfg.reference not in REFERENCES:
        raise ValueError(f"model.lora.reference={cfg.reference!r}: expected 'policy' (the "
                         "starting policy: the base with the initial adapters) or 'base' (the "
                         "base with the adapters off)")
    return cfg


# ------------------------------------------------------------------------------ targets
@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted projection: its base weight at ``path`` holds ``lead`` stacked axes (the
    layers), then input then output axes (the LM head: output ``[V]`` then input ``[D]``)."""

    name: str
    path: tuple[str, ...]
    lead: tuple[int, ...]
    lead_axes: tuple
    in_shape: tuple[int, ...]
    in_axes: tuple
    out_shape: tuple[int, ...]
    out_axes: tuple

    def adapter_shapes(self, rank: int) -> dict[str, tuple]:
        return {"a": self.lead + self.in_shape + (rank,), "b": self.lead + (rank,) + self.out_shape}

    def adapter_axes(self) -> dict[str, tuple]:
        return {"a": self.lead_axes + self.in_axes + (None,),
                "b": self.lead_axes + (None,) + self.out_axes}

    @property
    def fan_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def fan_out(self) -> int:
        return math.prod(self.out_shape)


def _target_paths(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], int]]:
    """name -> (base weight path, number of input axes) of every projection name."""
    out = dict(quant.PROJECTIONS)
    # a tied head's adapter acts on the output projection only; the input embedding stays
    out[HEAD] = (("embed",) if cfg.tie_embeddings else ("lm_head",), 1)
    return out


def valid_targets(model: Model) -> tuple[str, ...]:
    """The projection names this model can adapt ('all' selects these but the LM head)."""
    abstract = model.abstract_params()
    moe = getattr(model.cfg, "n_experts", 0) > 0
    return tuple(n for n, (path, _) in _target_paths(model.cfg).items()
                 if _get(abstract, path) is not None and not (moe and n in MLP))


def resolve_targets(model: Model, cfg: LoraConfig) -> tuple[Target, ...]:
    """The :class:`Target` of each name in ``cfg.targets`` ('all': every projection but the LM
    head), checked against ``model``. Raises ValueError naming an unknown target (with the valid
    ones), a projection this model lacks (a tied LM head, the experts of a mixture-of-experts
    MLP, an ungated MLP's gate) and a rank larger than a target's smaller dimension."""
    abstract, axes = model.abstract_params(), model.logical_axes()
    valid = valid_targets(model)
    paths = _target_paths(model.cfg)
    names: list[str] = []
    for name in cfg.targets:
        if name == "all":
            names += [n for n in valid if n != HEAD and n not in names]
            continue
        if name not in paths:
            raise ValueError(f"model.lora.targets: unknown target {name!r}; valid targets of "
                             f"this model: {', '.join(valid)} (or 'all')")
        if name not in valid:
            why = {"gate": "its MLP is not gated"}.get(name, "")
            if name in MLP and getattr(model.cfg, "n_experts", 0) > 0:
                why = "its MLP is a mixture of experts, whose experts LoRA does not adapt"
            raise ValueError(f"model.lora.targets: {name!r} is not a projection of this model "
                             f"({why or 'absent'}); valid targets: {', '.join(valid)}")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("model.lora.targets is empty; name projections (e.g. 'q,v') or 'all'")
    out = []
    for name in names:
        path, n_in = paths[name]
        w, ax = _get(abstract, path), tuple(_get(axes, path))
        lead = 1 if path[0] == "layers" else 0
        body, body_axes = w.shape[lead:], ax[lead:]
        if name == HEAD:  # stored [V, D]: output first
            i_s, i_a, o_s, o_a = body[1:], body_axes[1:], body[:1], body_axes[:1]
        else:
            i_s, i_a, o_s, o_a = body[:n_in], body_axes[:n_in], body[n_in:], body_axes[n_in:]
        t = Target(name, path, tuple(w.shape[:lead]), ax[:lead], tuple(i_s), tuple(i_a),
                   tuple(o_s), tuple(o_a))
        if cfg.rank > min(t.fan_in, t.fan_out):
            raise ValueError(
                f"model.lora.rank={cfg.rank} is larger than target {name!r}'s dimension (input "
                f"{t.fan_in}, output {t.fan_out}); use a rank <= {min(t.fan_in, t.fan_out)}")
        out.append(t)
    return tuple(out)


# ------------------------------------------------------------------------------ the model
class LoraParam(nnx.Variable):
    """An adapter's A or B, or its per-layer dropout key, inside the adapted module graph."""


class Adapter(nnx.Module):
    """``x [..., I] -> scale * dropout(x) @ A @ B [..., O]`` (I, O flattened) for one layer's
    slice of a target; attached to its decoder module as ``lora_<name>`` (see
    ``decoder._adapted``). With ``rate`` > 0 it holds that layer's dropout key."""

    def __init__(self, shapes: dict[str, tuple], lead: tuple[int, ...], scale: float,
                 rate: float):
        self.a = LoraParam(jnp.zeros(shapes["a"], jnp.float32))
        self.b = LoraParam(jnp.zeros(shapes["b"], jnp.float32))
        self.scale, self.rate = float(scale), float(rate)
        if rate > 0:
            key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
            self.key = LoraParam(jnp.zeros(lead + key_data.shape, key_data.dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        dt = x.dtype
        a_IR = self.a[...].reshape(-1, self.a.shape[-1]).astype(dt)
        b_RO = self.b[...].reshape(self.b.shape[0], -1).astype(dt)
        x_NI = x.reshape(-1, x.shape[-1])
        if self.rate > 0:
            key = jax.random.wrap_key_data(self.key[...])
            keep = jax.random.bernoulli(key, 1.0 - self.rate, x_NI.shape)
            x_NI = jnp.where(keep, x_NI / jnp.asarray(1.0 - self.rate, dt), jnp.zeros((), dt))
        y_NO = (x_NI @ a_IR) @ b_RO
        return (y_NO * jnp.asarray(self.scale, dt)).reshape(*x.shape[:-1], -1)


def _insert(tree: Mapping, path: tuple, key: str, value) -> dict:
    """A copy of ``tree`` with ``value`` at ``path + (key,)`` (dicts copied along the path)."""
    out = dict(tree)
    if path:
        out[path[0]] = _insert(tree[path[0]], path[1:], key, value)
    else:
        out[key] = value
    return out


class LoraModel(Model):
    """A :class:`dpo_jax.models.Model` whose parameter trees may carry adapters: a tree with a
    ``'lora'`` entry (:func:`join`) runs with them, any other tree is the base alone. The base's
    ``init``, ``abstract_params`` and ``logical_axes`` are :class:`Model`'s."""

    def __init__(self, cfg: ModelConfig, lora: LoraConfig):
        super().__init__(cfg)
        if lora.rank <= 0:
            raise ValueError("LoraModel needs model.lora.rank > 0")
        self.lora = lora
        self.targets = resolve_targets(self, lora)
        self._graphdefs: dict[bool, Any] = {}

    # -- adapters ----------------------------------------------------------------------------
    def abstract_adapters(self) -> dict:
        """``{'lora': {target: {'a', 'b'}}}`` of float32 ShapeDtypeStructs."""
        return {"lora": {t.name: {k: jax.ShapeDtypeStruct(s, jnp.float32)
                                  for k, s in t.adapter_shapes(self.lora.rank).items()}
                         for t in self.targets}}

    def adapter_axes(self) -> dict:
        """Logical axes of :meth:`abstract_adapters` (rank axis None)."""
        return {"lora": {t.name: t.adapter_axes() for t in self.targets}}

    def init_adapters(self, rng: jax.Array) -> dict:
        """A Kaiming-uniform (bound ``1/sqrt(fan_in)``, PEFT's default) or Gaussian (std
        ``1/rank``), B zero: the adapted model equals the base. Jittable."""
        out = {}
        for i, t in enumerate(self.targets):
            shapes = t.adapter_shapes(self.lora.rank)
            k = jax.random.fold_in(rng, i)
            if self.lora.init == "kaiming":
                bound = 1.0 / math.sqrt(t.fan_in)
                a = jax.random.uniform(k, shapes["a"], jnp.float32, -bound, bound)
            else:
                a = jax.random.normal(k, shapes["a"], jnp.float32) / self.lora.rank
            out[t.name] = {"a": a, "b": jnp.zeros(shapes["b"], jnp.float32)}
        return {"lora": out}

    # -- the quantised base (dpo_jax/models/quant.py) ------------------------------------------
    def quantize_base(self, base):
        """The base with its projections in ``model.lora.base_quant`` (jittable)."""
        if self.lora.base_quant == "none" or quant.is_quantized(base):
            return base
        return quant.quantize_tree(self.cfg, self.lora.base_quant, base,
                                   self.lora.quant_embedding)

    def dequantize_base(self, base):
        """The float base (``param_dtype``) a quantised base stands for (merge, export)."""
        return quant.dequantize_tree(self.cfg, self.lora.base_quant, base, self.abstract_params(),
                                     jnp.dtype(self.cfg.param_dtype)) if quant.is_quantized(
                                         base) else base

    def abstract_base(self) -> dict:
        """ShapeDtypeStructs of :meth:`quantize_base`'s tree."""
        return jax.eval_shape(self.quantize_base, self.abstract_params())

    def base_axes(self) -> dict:
        """Logical axes of :meth:`abstract_base` (quantised leaves shard like their weight)."""
        return self.logical_axes() if self.lora.base_quant == "none" else quant.tree_axes(
            self.cfg, self.lora.base_quant, self.abstract_params(), self.logical_axes(),
            self.lora.quant_embedding)

    # -- forward -----------------------------------------------------------------------------
    def _adapted_graphdef(self, dropout: bool | None):
        """The graphdef with adapters (``dropout``: with their dropout keys; None: no adapters)
        and the quantised base's modules."""
        if dropout not in self._graphdefs:
            rate = self.lora.dropout if dropout else 0.0

            def build():
                module = decoder.Decoder(self.cfg, nnx.Rngs(0))
                if self.lora.base_quant != "none":
                    quant.attach(module, self.cfg, self.lora.base_quant, self.abstract_params(),
                                 self.lora.quant_embedding)
                for t in self.targets if dropout is not None else ():
                    if t.name != HEAD:
                        owner = module
                        for k in t.path[:-1]:
                            owner = getattr(owner, k)
                        setattr(owner, "lora_" + t.name,
                                Adapter(t.adapter_shapes(self.lora.rank), t.lead,
                                        self.lora.scale, rate))
                return module

            self._graphdefs[dropout] = nnx.graphdef(nnx.eval_shape(build))
        return self._graphdefs[dropout]

    def _module(self, params, key: jax.Array | None = None):
        if "lora" not in params:
            if self.lora.base_quant != "none" and quant.is_quantized(params):
                return nnx.merge(self._adapted_graphdef(None), params)
            return super()._module(params)
        dropout = key is not None and self.lora.dropout > 0
        tree = {k: v for k, v in params.items() if k != "lora"}
        for i, t in enumerate(self.targets):
            if t.name == HEAD:
                continue
            value = dict(params["lora"][t.name])
            if dropout:
                keys = jax.random.split(jax.random.fold_in(key, i), math.prod(t.lead) or 1)
                value["key"] = jax.random.key_data(keys).reshape(*t.lead, -1)
            tree = _insert(tree, t.path[:-1], "lora_" + t.name, value)
        return nnx.merge(self._adapted_graphdef(dropout), tree)

    def hidden(self, params, input_ids_BL, positions_BL, segment_ids_BL, branch_ids_BL=None,
               router_aux: bool = False, dropout_rng: jax.Array | None = None,
               routing: bool = False, tree_BL=None):
        """:meth:`Model.hidden` of the adapted model; ``dropout_rng`` (a key, e.g.
        :func:`step_key`; None: no dropout) draws the adapters' dropout masks."""
        return self._module(params, dropout_rng)(input_ids_BL, positions_BL, segment_ids_BL,
                                                 branch_ids_BL, router_aux, routing, tree_BL)

    def logits(self, params, input_ids_BL, positions_BL, segment_ids_BL, branch_ids_BL=None,
               dropout_rng: jax.Array | None = None):
        """:meth:`Model.logits` of the adapted model (``dropout_rng``: see :meth:`hidden`)."""
        h = self.hidden(params, input_ids_BL, positions_BL, segment_ids_BL, branch_ids_BL,
                        dropout_rng=dropout_rng)
        return project(h, *self.unembedding(params, caller_applies_softcap=True),
                       softcap=self.cfg.final_logit_softcap)

    def unembedding(self, params, *, caller_applies_softcap: bool = False):
        """:meth:`Model.unembedding`, with an adapted LM head merged: ``W + scale * (A @ B)^T``
        (``[V, D]``, in the base's dtype; the head's input gets no dropout)."""
        w, b = super().unembedding(params, caller_applies_softcap=caller_applies_softcap)
        if "lora" in params and HEAD in params["lora"]:
            ab = params["lora"][HEAD]
            w = w + (self.lora.scale * (ab["a"] @ ab["b"])).T.astype(w.dtype)
        return w, b


def make_model(cfg: ModelConfig, lora: LoraConfig | None) -> Model:
    """:class:`LoraModel` when ``lora.rank`` > 0, else the plain :class:`Model`."""
    return LoraModel(cfg, lora) if lora is not None and lora.rank > 0 else Model(cfg)


def join(base, params):
    """The policy's parameter tree: ``params`` when they are a whole model (full fine-tuning),
    else the adapters ``params`` over the frozen ``base`` (``{**base, 'lora': ...}``: they
    replace the reference's frozen initial adapters when ``base`` holds some). Arrays only: the
    dropout key goes to :meth:`LoraModel.hidden` (``dropout_rng``)."""
    if base is None or "lora" not in params:
        return params
    return {**base, "lora": params["lora"]}


def policy_of(state):
    """The policy's parameter tree of a ``TrainState``: :func:`join` of its LoRA base (when
    ``state.frozen`` holds one) and its ``trainable`` tree."""
    frozen = state.frozen
    return join(None if frozen is None else frozen.lora_base, state.trainable)


def step_rng(model: Model, step: jax.Array) -> jax.Array | None:
    """The dropout key of update ``step`` (None without dropout), fixed by the seed and the
    step, so a resumed run draws the same masks; the step builder folds in the micro-batch
    (``optim.accumulate``), giving :func:`step_key`."""
    lora = getattr(model, "lora", None)
    if lora is None or lora.dropout <= 0:
        return None
    return jax.random.fold_in(jax.random.key(lora.seed), step)


def step_key(model: Model, step: jax.Array, micro: int | jax.Array = 0) -> jax.Array | None:
    """The dropout key of update ``step``'s micro-batch ``micro`` (None without dropout)."""
    rng = step_rng(model, step)
    return None if rng is None else jax.random.fold_in(rng, micro)


# ------------------------------------------------------------------------------ merge
def delta(target: Target, ab: Mapping[str, jax.Array], scale: float) -> jax.Array:
    """``scale * A @ B`` in float32, shaped as the target's base weight."""
    a = ab["a"].astype(jnp.float32)
    b = ab["b"].astype(jnp.float32)
    r = a.shape[-1]
    lead = a.shape[:len(target.lead)]
    a_LIR = a.reshape(*lead, target.fan_in, r)
    b_LRO = b.reshape(*lead, r, target.fan_out)
    d = scale * jnp.matmul(a_LIR, b_LRO)
    if target.name == HEAD:
        return d.T.reshape(target.out_shape + target.in_shape)
    return d.reshape(target.lead + target.in_shape + target.out_shape)


def merged_config(model: LoraModel) -> ModelConfig:
    """The config of :func:`merge`'s model: ``model.cfg``, untied when the adapters act on a
    tied LM head (the merged head then differs from the input embedding)."""
    tied_head = model.cfg.tie_embeddings and any(t.name == HEAD for t in model.targets)
    return dataclasses.replace(model.cfg, tie_embeddings=False) if tied_head else model.cfg


def merge(model: LoraModel, base, adapters):
    """The base with the adapters folded in (``W + scale * A @ B`` per target, computed in
    float32, stored in each weight's dtype; a quantised base dequantised first): a plain
    parameter tree of the adapted model, whose config is :func:`merged_config` (an adapted tied
    head becomes an ``lm_head`` of its own)."""
    out = base = model.dequantize_base(base)
    for t in model.targets:
        w = _get(base, t.path)
        new = (w.astype(jnp.float32) + delta(t, adapters["lora"][t.name], model.lora.scale)
               ).astype(w.dtype)
        path = ("lm_head",) if t.name == HEAD else t.path
        out = _insert(out, path[:-1], path[-1], new)
    return out
