"""LoRA (Hu et al. 2021, *LoRA: Low-Rank Adaptation of Large Language Models*): a policy that
is a frozen base plus trained low-rank adapters, whose reference is the base with the adapters
off (TRL's default with PEFT): one copy of the base weights serves both forwards.

At each targeted projection ``y = x @ W`` the adapted model computes
``y = x @ W + (alpha / rank) * dropout(x) @ A @ B`` (``W + A @ B`` is never formed in a training
step). ``A`` starts Kaiming-uniform (PEFT's default) or Gaussian (std ``1/rank``), ``B`` at
zero, so step 0 is the base exactly.

Parameter trees (ARCHITECTURE.md: plain nested dicts):
  * the base: ``Model.init``'s tree, frozen (no gradient, no optimizer state), in
    ``model.param_dtype`` (bfloat16 halves it);
  * the adapters: ``{'lora': {target: {'a': A, 'b': B}}}`` in float32, trained. For a layer
    projection with base weight ``[layers, *in, *out]``: ``A [layers, *in, r]``, ``B [layers,
    r, *out]``, each with its base weight's logical axes and the rank axis unsharded; the LM
    head (``[V, D]``): ``A [D, r]``, ``B [r, V]``;
  * the policy's tree in a forward: :func:`join` of the two (``{**base, 'lora': ...}``).
    :class:`LoraModel` runs it with the adapters attached at their projections; a tree without
    ``'lora'`` runs the base alone (the reference).

In a train state (``dpo_jax/state.py``) ``params`` are the adapters and ``ref_params`` the
frozen base. Checkpoints hold the adapters and their optimizer state, plus the base's
fingerprint (:class:`BaseFingerprint`, the ``lora_base`` item) that a resume checks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dpo_jax.models import Model, ModelConfig, decoder

ATTENTION = ("q", "k", "v", "o")
MLP = ("up", "gate", "down")
HEAD = "lm_head"
INITS = ("kaiming", "gaussian")
ITEM = "lora_base"  # the checkpoint item holding the base's fingerprint
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


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
                     seed=int(seed))
    if cfg.rank < 0:
        raise ValueError(f"model.lora.rank={cfg.rank}: must be >= 0 (0 = full fine-tuning)")
    if cfg.init not in INITS:
        raise ValueError(f"model.lora.init={cfg.init!r}: expected one of {INITS}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"model.lora.dropout={cfg.dropout}: must be in [0, 1)")
    return cfg


def check_run(rc) -> None:
    """Refuse settings that contradict a LoRA policy (``rc`` a ``config.RunConfig``): a reference
    model of its own (the reference is the base with the adapters off), a reference dtype other
    than the base's, and TR-DPO (which would move the reference, i.e. the base)."""
    if not rc.lora.rank:
        return
    s = rc.sources
    if s.reference or s.reference_hf:
        which = (f"init.reference={s.reference!r}" if s.reference
                 else f"model.ref_hf_path={s.reference_hf!r}")
        raise ValueError(
            f"model.lora.rank={rc.lora.rank} with {which}: under LoRA the reference is the base "
            "model with the adapters off, so a separate reference model is ambiguous. Unset it "
            "(the base comes from init.policy or model.hf_path), or set model.lora.rank=0 to "
            "fine-tune all parameters against that reference")
    if s.reference_dtype and s.reference_dtype != rc.model.param_dtype:
        raise ValueError(
            f"model.ref_param_dtype={s.reference_dtype!r} with LoRA: the reference is the base, "
            f"stored in model.param_dtype={rc.model.param_dtype!r}; set that one instead and "
            "leave model.ref_param_dtype=''")
    if rc.step.ref_sync_every:
        raise ValueError("train.ref_sync_every > 0 (TR-DPO) moves the reference, which under "
                         "LoRA is the frozen base; set train.ref_sync_every=0 or "
                         "model.lora.rank=0")


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


def _get(tree, path):
    for k in path:
        if not isinstance(tree, Mapping) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _target_paths(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], int]]:
    """name -> (base weight path, number of input axes) of every projection name."""
    out = {n: (("layers", "attn", n), 2 if n == "o" else 1) for n in ATTENTION}
    out.update({n: (("layers", "mlp", n), 1) for n in MLP})
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

    # -- forward -----------------------------------------------------------------------------
    def _adapted_graphdef(self, dropout: bool):
        if dropout not in self._graphdefs:
            rate = self.lora.dropout if dropout else 0.0

            def build():
                module = decoder.Decoder(self.cfg, nnx.Rngs(0))
                for t in self.targets:
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

    def _module(self, params):
        if "lora" not in params:
            return super()._module(params)
        key = params.get("lora_key")
        dropout = key is not None and self.lora.dropout > 0
        tree = {k: v for k, v in params.items() if k not in ("lora", "lora_key")}
        for i, t in enumerate(self.targets):
            if t.name == HEAD:
                continue
            value = dict(params["lora"][t.name])
            if dropout:
                keys = jax.random.split(jax.random.fold_in(key, i), math.prod(t.lead) or 1)
                value["key"] = jax.random.key_data(keys).reshape(*t.lead, -1)
            tree = _insert(tree, t.path[:-1], "lora_" + t.name, value)
        return nnx.merge(self._adapted_graphdef(dropout), tree)

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


def join(base, params, key: jax.Array | None = None):
    """The policy's parameter tree: ``params`` when they are a whole model (full fine-tuning),
    else the adapters ``params`` over the frozen ``base`` (``{**base, 'lora': ...}``), with the
    step's dropout ``key`` (None: no dropout, e.g. evaluation)."""
    if base is None or "lora" not in params:
        return params
    tree = {**base, "lora": params["lora"]}
    if key is not None:
        tree["lora_key"] = key
    return tree


def step_key(model: Model, step: jax.Array, micro: int | jax.Array = 0) -> jax.Array | None:
    """The dropout key of update ``step``'s micro-batch ``micro`` (None without dropout):
    fixed by the seed and the step, so a resumed run draws the same masks."""
    lora = getattr(model, "lora", None)
    if lora is None or lora.dropout <= 0:
        return None
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(lora.seed), step), micro)


def gradient_step(loss_fn: Callable, tx, schedule, on_nonfinite: str = "error",
                  model: Model | None = None) -> Callable:
    """:func:`dpo_jax.optim.gradient_step` over :func:`join` ``(state.ref_params,
    state.params)``: ``loss_fn(policy_params, batch, max_scored)`` is differentiated with
    respect to ``state.params`` (the adapters under LoRA, the whole model otherwise)."""
    from dpo_jax.optim import gradient_step as plain

    def train_step(state, batch, max_scored=None):
        key = step_key(model, state.step)
        step = plain(lambda p, b, n: loss_fn(join(state.ref_params, p, key), b, n), tx,
                     schedule, on_nonfinite)
        return step(state, batch, max_scored)

    return train_step


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
    float32, stored in each weight's dtype): a plain parameter tree of the adapted model, whose
    config is :func:`merged_config` (an adapted tied head becomes an ``lm_head`` of its own)."""
    out = base
    for t in model.targets:
        w = _get(base, t.path)
        new = (w.astype(jnp.float32) + delta(t, adapters["lora"][t.name], model.lora.scale)
               ).astype(w.dtype)
        path = ("lm_head",) if t.name == HEAD else t.path
        out = _insert(out, path[:-1], path[-1], new)
    return out


# ------------------------------------------------------------------------------ the base
class BaseFingerprint:
    """The ``lora_base`` checkpoint item: where the frozen base came from and a checksum of its
    values (per leaf: dtype, shape and three float32 sums, ``reference.param_checksum``).
    Restoring it into a run whose base differs raises ValueError, so adapters are never resumed
    on another base."""

    def __init__(self, base, source: Mapping[str, Any]):
        from dpo_jax.reference import param_checksum

        self.value = {"source": dict(source), "checksum": param_checksum(base)}

    def state_dict(self) -> dict:
        return self.value

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved, now = state, self.value
        if dict(saved["source"]) != now["source"]:
            raise ValueError(f"the checkpoint's adapters were trained on the base "
                             f"{dict(saved['source'])}, this run's base is {now['source']}; "
                             "resume with the base the run started with")
        same = len(saved["checksum"]) == len(now["checksum"]) and all(
            a[:2] == b[:2] and np.allclose(a[2:], b[2:], rtol=1e-6, atol=1e-6)
            for a, b in zip(saved["checksum"], now["checksum"]))
        if not same:
            raise ValueError(
                f"the frozen base from {now['source']} is not the one the checkpoint's adapters "
                "were trained on (its values' checksum differs: were the files at that path "
                "replaced, or the run given as init.policy trained further?); restore that base "
                "or start a new run in another --workdir")


def host_states(state, sources) -> dict:
    """``{'lora_base': BaseFingerprint}`` for ``loop.train(host_states=...)`` when ``state``
    is a LoRA state (``sources``: the base's ``config.ParamSources``), else ``{}``."""
    if state.ref_params is None or "lora" not in state.params:
        return {}
    return {ITEM: BaseFingerprint(state.ref_params, {
        "policy": sources.policy, "policy_hf": sources.policy_hf, "seed": sources.seed})}


def read_run_config(run_dir: str):
    """The ml_collections config a run was started with (its ``config.json``), or None."""
    import ml_collections

    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def run_lora(config) -> LoraConfig:
    """The LoRA settings of a run's config (off when the block is absent)."""
    return read_lora(config.model.get("lora") if config is not None else None,
                     int(config.seed) if config is not None else 0)


def run_base_and_adapters(run_dir: str, model: Model, shardings, step: int | None = None):
    """``(LoraModel, base, adapters)`` of the LoRA run in ``run_dir``: its base rebuilt from its
    own sources in its own ``param_dtype`` (``shardings``: those of ``model``, a model of the
    same shapes) and checked against the checkpoint's fingerprint, and its adapters from its
    checkpoint (``step`` or the newest), replicated. Raises ValueError when the rebuilt base is
    not the one the adapters were trained on."""
    from dpo_jax import checkpoint as ckpt_lib
    from dpo_jax import state as state_lib
    from dpo_jax.config import read_config

    config = read_run_config(run_dir)
    rc = read_config(config)
    lora_model = LoraModel(rc.model, rc.lora)
    base = state_lib.init_policy(lora_model, shardings, rc.sources)
    base = state_lib.as_dtype(base, shardings, rc.model.param_dtype)
    one = jax.tree.leaves(shardings)[0]
    rep = jax.sharding.NamedSharding(one.mesh, jax.sharding.PartitionSpec()) if isinstance(
        one, jax.sharding.NamedSharding) else one
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                        lora_model.abstract_adapters())
    adapters = ckpt_lib.restore_params(run_dir, like, step=step)
    saved = ckpt_lib.restore_json_item(run_dir, ITEM, step=step)
    if saved is not None:
        host_states(_View(base, adapters), rc.sources)[ITEM].load_state_dict(saved)
    return lora_model, base, adapters


@dataclasses.dataclass
class _View:
    ref_params: Any
    params: Any


def run_params(run_dir: str, model: Model, shardings, step: int | None = None):
    """The policy parameters of another run (its workdir), in ``shardings``: its checkpoint's
    parameters, or for a LoRA run its base with its adapters merged in, in ``model``'s
    ``param_dtype`` (the paper's SFT model as DPO's init and reference, when the SFT run
    trained adapters)."""
    from dpo_jax import checkpoint as ckpt_lib
    from dpo_jax.state import abstract

    config = read_run_config(run_dir)
    if config is None or not run_lora(config).rank:
        return ckpt_lib.restore_params(run_dir, abstract(model.abstract_params(), shardings),
                                       step=step)
    from dpo_jax.state import cast_floats

    lora_model, base, adapters = run_base_and_adapters(run_dir, model, shardings, step)
    if merged_config(lora_model).tie_embeddings != model.cfg.tie_embeddings:
        raise ValueError(
            f"the LoRA run {run_dir!r} adapted the LM head of a model whose head is tied to its "
            "input embedding: merged, its head is a separate matrix, which this run's tied model "
            "cannot hold. Leave lm_head out of that run's model.lora.targets, or adapt the head "
            "in this run instead")
    dtype = jnp.dtype(model.cfg.param_dtype)
    return jax.jit(lambda b, a: merge(lora_model, cast_floats(b, dtype), a),
                   out_shardings=shardings)(base, adapters)


# ------------------------------------------------------------------------------ PEFT
def _peft_modules(model: LoraModel) -> dict[str, str]:
    """target name -> the HF module name pattern (``{i}`` = layer) that PEFT adapts. Raises
    ValueError for a target whose HF tensor is fused with others (GPT-2's c_attn, NeoX's
    query_key_value, Phi-3's qkv_proj / gate_up_proj): one PEFT module per target is needed."""
    from dpo_jax.models import hf_maps

    prefix = hf_maps.FAMILY_MAPS[model.cfg.family][1][0]
    out = {}
    for t in model.targets:
        if t.name == HEAD:  # transformers' causal LMs name it so, tied or not
            out[t.name] = "lm_head"
            continue
        part = t.path[1:] if t.path[0] == "layers" else t.path
        specs = [s for s in hf_maps.tensor_specs(model.cfg) if part in s.parts]
        spec = specs[0] if specs else None
        ok = spec is not None and len(spec.parts) == 1 and spec.layout == "T"
        if not ok:
            raise ValueError(
                f"PEFT export: target {t.name!r} is stored in the {model.cfg.family} checkpoint "
                f"as {spec.name if spec else 'no tensor'!r}, fused with other projections, "
                "which one LoRA module cannot represent; export the merged model instead, or "
                "target other projections")
        name = spec.name[:-len(".weight")]
        out[t.name] = name if not spec.layered else hf_maps.full_name(name, prefix, None)
    return out


def _peft_key(pattern: str, layer: int | None, which: str) -> str:
    name = pattern.replace("{i}", str(layer)) if layer is not None else pattern
    return f"base_model.model.{name}.lora_{which}.weight"


def save_peft(out: str, model: LoraModel, adapters, base_model: str = "") -> str:
    """Write ``adapters`` as a PEFT LoRA directory (``adapter_config.json`` +
    ``adapter_model.safetensors``) that ``peft.PeftModel.from_pretrained(base, out)`` loads onto
    the exported base. Returns ``out``."""
    from safetensors.numpy import save_file

    modules = _peft_modules(model)
    host = jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), adapters["lora"])
    r = model.lora.rank
    tensors = {}
    for t in model.targets:
        a, b = host[t.name]["a"], host[t.name]["b"]
        layers = range(t.lead[0]) if t.lead else [None]
        for i in layers:
            a_i = a[i] if i is not None else a
            b_i = b[i] if i is not None else b
            tensors[_peft_key(modules[t.name], i, "A")] = np.ascontiguousarray(
                a_i.reshape(t.fan_in, r).T)
            tensors[_peft_key(modules[t.name], i, "B")] = np.ascontiguousarray(
                b_i.reshape(r, t.fan_out).T)
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, PEFT_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": model.lora.alpha, "lora_dropout": model.lora.dropout,
        "target_modules": sorted({p.split(".")[-1] for p in modules.values()}),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
    }
    with open(os.path.join(out, PEFT_CONFIG), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    return out


def load_peft(path: str, model: LoraModel, shardings) -> dict:
    """Adapters from a PEFT LoRA directory, as ``model``'s adapter tree in ``shardings``.

    Raises ValueError when its rank, alpha or adapted modules differ from ``model.lora`` (the
    message names both), FileNotFoundError when a file is missing."""
    from safetensors import safe_open

    cfg_path, w_path = os.path.join(path, PEFT_CONFIG), os.path.join(path, PEFT_WEIGHTS)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"model.lora.path={path!r}: {os.path.basename(p)} not found "
                                    "(a PEFT LoRA directory holds adapter_config.json and "
                                    "adapter_model.safetensors)")
    with open(cfg_path) as f:
        peft_cfg = json.load(f)
    lora = model.lora
    if int(peft_cfg.get("r", -1)) != lora.rank or float(peft_cfg.get("lora_alpha", -1)) != lora.alpha:
        raise ValueError(f"{cfg_path}: r={peft_cfg.get('r')}, lora_alpha="
                         f"{peft_cfg.get('lora_alpha')}; the run has model.lora.rank={lora.rank}, "
                         f"alpha={lora.alpha}: set them to the adapter's")
    if peft_cfg.get("fan_in_fan_out") or peft_cfg.get("use_rslora") or peft_cfg.get("use_dora"):
        raise ValueError(f"{cfg_path}: fan_in_fan_out / use_rslora / use_dora adapters are not "
                         "plain LoRA; convert them first")
    modules = _peft_modules(model)
    out = {}
    with safe_open(w_path, framework="np") as f:
        keys = set(f.keys())
        for t in model.targets:
            layers = range(t.lead[0]) if t.lead else [None]
            ab = {"a": [], "b": []}
            for i in layers:
                for which, k in (("A", "a"), ("B", "b")):
                    name = _peft_key(modules[t.name], i, which)
                    if name not in keys:
                        raise ValueError(f"{w_path}: no tensor {name!r} for target {t.name!r} "
                                         f"(model.lora.targets={','.join(lora.targets)}); the "
                                         "adapter must cover exactly the run's targets")
                    keys.discard(name)
                    ab[k].append(f.get_tensor(name).astype(np.float32).T)
            shapes = t.adapter_shapes(lora.rank)
            out[t.name] = {k: np.stack(v).reshape(shapes[k]) if t.lead else v[0].reshape(shapes[k])
                           for k, v in ab.items()}
        if keys:
            raise ValueError(f"{w_path}: tensors for modules the run does not adapt: "
                             f"{sorted(keys)[:4]}...; set model.lora.targets to the adapter's")
    return jax.device_put({"lora": out}, shardings)
