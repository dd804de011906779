"""Parameters from their sources and what every task builds first (``setup``): another run's
checkpoint (a LoRA run's base rebuilt and its adapters merged in), an HF directory or a seeded
init, the frozen reference, the optimizer and the shardings.

The state's types and tree helpers live one layer down in ``train_state`` (re-exported here:
``state.TrainState``, ``state.create_state``, ...). Parameters are plain nested dicts
(ARCHITECTURE.md). Every tree is created directly in its sharding (``jax.jit(...,
out_shardings=...)`` or a sharded restore), never whole on one host.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dpo_jax import checkpoint as ckpt_lib
from dpo_jax import lora as lora_lib
from dpo_jax import lora_base
from dpo_jax import lora_peft
from dpo_jax import sharding as shard_lib
from dpo_jax.config import read_config
from dpo_jax.lora import LoraModel, merge, merged_config
from dpo_jax.models import Model, hf
from dpo_jax.optim import make_optimizer
# The state's types and tree helpers, re-exported: state.TrainState, state.create_state, ...
from dpo_jax.train_state import Frozen, TrainState, abstract, as_dtype  # noqa: F401
from dpo_jax.train_state import cast_floats, create_state, param_checksum  # noqa: F401
from dpo_jax.train_state import param_shardings

def init_params(model, shardings, *, checkpoint: str = "", hf_path: str = "", seed: int = 0,
                dtype: str = ""):
    """Parameters of ``model`` in ``shardings`` from, in order of precedence: another run's
    ``checkpoint`` (its workdir; a LoRA run's base with its adapters merged in), an HF
    directory ``hf_path``, or a seeded random init; cast to ``dtype`` when given (e.g.
    'bfloat16' for a frozen reference)."""
    if checkpoint:
        params = run_params(checkpoint, model, shardings)
    elif hf_path:
        params = hf.load_hf_params(hf_path, model.cfg, shardings=shardings)
    else:
        params = jax.jit(model.init, out_shardings=shardings)(jax.random.key(seed))
    if dtype:
        params = jax.jit(lambda p: cast_floats(p, jnp.dtype(dtype)), out_shardings=shardings)(params)
    return params


def init_policy(model, shardings, sources):
    """The policy's initial parameters from ``sources`` (a ``config.ParamSources``)."""
    return init_params(model, shardings, checkpoint=sources.policy, hf_path=sources.policy_hf,
                       seed=sources.seed)


def init_reference(model, shardings, sources, policy_params):
    """The frozen reference: its own source when ``sources`` names one, else a (cast) copy of
    the initial ``policy_params``."""
    if sources.reference or sources.reference_hf:
        return init_params(model, shardings, checkpoint=sources.reference,
                           hf_path=sources.reference_hf, seed=sources.seed,
                           dtype=sources.reference_dtype)
    cast = (lambda p: cast_floats(p, jnp.dtype(sources.reference_dtype))) if (
        sources.reference_dtype) else (lambda p: jax.tree.map(jnp.copy, p))
    return jax.jit(cast, out_shardings=shardings)(policy_params)


class Setup(NamedTuple):
    """What every task builds first, by field name: the mesh, the optimizer ``tx`` over
    ``updates`` steps and its ``schedule``, the ``trainable`` tree's ``shardings``, the initial
    ``trainable`` parameters and the ``frozen`` ones (a ``Frozen``, or None). Under LoRA:
    ``trainable`` the initial adapters (and ``shardings`` theirs), ``frozen.lora_base`` the
    frozen base (always). A task changes what is frozen with ``setup._replace(frozen=...)``."""

    mesh: Any
    tx: optax.GradientTransformation
    schedule: Callable
    shardings: Any
    trainable: Any
    frozen: Frozen | None = None

    def initial_state(self) -> TrainState:
        """The step-0 ``TrainState`` of ``trainable`` and ``frozen`` (``create_state``)."""
        return create_state(self.trainable, self.tx, self.mesh, self.shardings, self.frozen)


def setup(rc, model, *, updates: int | None = None, init: Callable | None = None,
          reference: bool = False) -> Setup:
    """:class:`Setup` of ``model`` under a ``config.RunConfig``: the mesh of ``rc.mesh_shape``,
    ``make_optimizer(rc.optim, updates or rc.train.steps)``, shardings by ``rc.mesh_rules``,
    ``init(model, shardings, rc.param_sources)`` (default :func:`init_policy`) and, with
    ``reference``, :func:`init_reference`.

    With ``rc.lora.rank`` > 0 (``model`` a ``lora.LoraModel``): the base from ``init`` in
    ``model.param_dtype`` as ``frozen.lora_base``, and the adapters (seeded, or
    ``rc.lora.path``, a PEFT directory) as ``trainable``. The reference is the starting
    policy (``model.lora.reference='policy'``): with ``reference`` and adapters from
    ``rc.lora.path``, the base also holds a frozen copy of them under ``'lora'``
    (``lora.join`` puts the trained ones in their place for the policy); with
    ``model.lora.reference='base'`` the reference is the bare base. Raises ValueError for LoRA
    settings the run contradicts (``lora_base.check_run``) or a task whose model carries no
    adapters."""
    lora = getattr(rc, "lora", None)
    if lora is not None and lora.rank:
        if not isinstance(model, lora_lib.LoraModel):
            raise ValueError(f"model.lora.rank={lora.rank}: task {rc.task!r} does not train "
                             "adapters (LoRA runs: task dpo or sft); set model.lora.rank=0")
        lora_base.check_run(rc)
    mesh = shard_lib.make_mesh(rc.mesh_shape)
    tx, schedule = make_optimizer(rc.optim, updates or rc.train.steps)
    shardings = param_shardings(model, mesh, rc.mesh_rules)
    if lora is not None and lora.rank:
        base = init_base(model, shardings, rc.param_sources, init=init,
                         base_shardings=shard_lib.tree_shardings(
                             model.abstract_base(), model.base_axes(), mesh, rc.mesh_rules))
        adapter_shardings = shard_lib.tree_shardings(
            model.abstract_adapters(), model.adapter_axes(), mesh, rc.mesh_rules)
        if lora.path:
            adapters = lora_peft.load_peft(lora.path, model, adapter_shardings)
            if reference and lora.reference == "policy":  # the reference: base + these, frozen
                frozen = jax.jit(lambda a: jax.tree.map(jnp.copy, a),
                                 out_shardings=adapter_shardings)(adapters)
                base = {**base, "lora": frozen["lora"]}
        else:  # B = 0: the starting policy is the base
            adapters = jax.jit(model.init_adapters, out_shardings=adapter_shardings)(
                jax.random.fold_in(jax.random.key(lora.seed), 1))
        return Setup(mesh, tx, schedule, adapter_shardings, trainable=adapters,
                     frozen=Frozen(lora_base=base))
    params = (init or init_policy)(model, shardings, rc.param_sources)
    frozen = (Frozen(reference=init_reference(model, shardings, rc.param_sources, params))
              if reference else None)
    return Setup(mesh, tx, schedule, shardings, trainable=params, frozen=frozen)


def init_base(model: LoraModel, shardings, sources, *, init: Callable | None = None,
              base_shardings=None):
    """A LoRA run's frozen base in ``model.param_dtype``: the policy's initial parameters
    (``init``, default :func:`init_policy`, in ``shardings``) and, under
    ``model.lora.base_quant``, quantised into ``base_shardings`` (``model.abstract_base`` /
    ``model.base_axes``; None: replicated on the default device). An HF directory (with no run
    checkpoint as the policy) is quantised layer by layer as it is read
    (``hf.load_hf_quantized``: the float base never exists whole); other sources are built whole
    in float, then quantised (the float tree is dropped on return)."""
    lora = model.lora
    if lora.base_quant != "none" and init is None and sources.policy_hf and not sources.policy:
        return hf.load_hf_quantized(sources.policy_hf, model.cfg, lora.base_quant,
                                    base_shardings, lora.quant_embedding)
    base = as_dtype((init or init_policy)(model, shardings, sources), shardings,
                    model.cfg.param_dtype)
    if lora.base_quant != "none":  # QLoRA
        base = jax.jit(model.quantize_base, out_shardings=base_shardings)(base)
    return base


def run_base_and_adapters(run_dir: str, model: Model, shardings, step: int | None = None):
    """``(LoraModel, base, adapters)`` of the LoRA run in ``run_dir``: its base rebuilt from its
    own sources in its own ``param_dtype`` (``shardings``: those of ``model``, a model of the
    same shapes) and checked against the checkpoint's fingerprint, and its adapters from its
    checkpoint (``step`` or the newest), replicated. Raises ValueError when the rebuilt base is
    not the one the adapters were trained on."""
    config = lora_base.read_run_config(run_dir)
    rc = read_config(config)
    lora_model = LoraModel(rc.model, rc.lora)
    one = jax.tree.leaves(shardings)[0]
    base_shardings = shard_lib.tree_shardings(  # the quantised base sharded like the float one
        lora_model.abstract_base(), lora_model.base_axes(), one.mesh, rc.mesh_rules) if (
            isinstance(one, jax.sharding.NamedSharding)) else None
    base = init_base(lora_model, shardings, rc.param_sources,  # quantised as it was trained
                     base_shardings=base_shardings)
    rep = jax.sharding.NamedSharding(one.mesh, jax.sharding.PartitionSpec()) if isinstance(
        one, jax.sharding.NamedSharding) else one
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                        lora_model.abstract_adapters())
    adapters = ckpt_lib.restore_params(run_dir, like, step=step)
    saved = ckpt_lib.restore_json_item(run_dir, lora_base.ITEM, step=step)
    if saved is not None:
        lora_base.BaseFingerprint(base, lora_base.source_of(rc.param_sources)).load_state_dict(saved)
    return lora_model, base, adapters


def run_params(run_dir: str, model: Model, shardings, step: int | None = None):
    """The policy parameters of another run (its workdir), in ``shardings``: its checkpoint's
    parameters, or for a LoRA run its base with its adapters merged in, in ``model``'s
    ``param_dtype`` (the paper's SFT model as DPO's init and reference, when the SFT run
    trained adapters)."""
    config = lora_base.read_run_config(run_dir)
    if config is None or not lora_base.run_lora(config).rank:
        return ckpt_lib.restore_params(run_dir, abstract(model.abstract_params(), shardings),
                                       step=step)
    lora_model, base, adapters = run_base_and_adapters(run_dir, model, shardings, step)
    if merged_config(lora_model).tie_embeddings != model.cfg.tie_embeddings:
        raise ValueError(
            f"the LoRA run {run_dir!r} adapted the LM head of a model whose head is tied to its "
            "input embedding: merged, its head is a separate matrix, which this run's tied model "
            "cannot hold. Leave lm_head out of that run's model.lora.targets, or adapt the head "
            "in this run instead")
    dtype = jnp.dtype(model.cfg.param_dtype)
    return jax.jit(lambda b, a: merge(lora_model, cast_floats(lora_model.dequantize_base(b),
                                                              dtype), a),
                   out_shardings=shardings)(base, adapters)


