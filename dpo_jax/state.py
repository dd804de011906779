"""The sharded train state of every task: parameters from a source, optimizer state, restore targets.

Parameters are plain nested dicts (ARCHITECTURE.md). Every tree is created directly in its
sharding (``jax.jit(..., out_shardings=...)`` or a sharded restore), never whole on one host.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from dpo_jax import sharding as shard_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 [], replicated: optimizer updates applied so far
    params: Any  # the trained parameters: the whole policy, or its adapters under LoRA
    # The frozen reference: None when the loss is reference-free or reference log-probs are
    # precomputed. Under LoRA (dpo_jax/lora.py) it is always the frozen base, the policy's
    # weights under its adapters, plus (reference = the starting policy, adapters from
    # model.lora.path) a frozen copy of the initial adapters under 'lora'.
    ref_params: Any
    opt_state: Any


def param_shardings(model, mesh, rules):
    """NamedShardings of ``model``'s parameter tree under the logical-axis ``rules``."""
    return shard_lib.tree_shardings(model.abstract_params(), model.logical_axes(), mesh, rules)


def abstract(tree, shardings=None):
    """``jax.ShapeDtypeStruct`` tree with shardings: the target a checkpoint restores into.

    Leaves of ``tree`` may be arrays or ShapeDtypeStructs; ``shardings`` (same structure)
    replaces theirs."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


def cast_floats(tree, dtype):
    """Floating leaves of ``tree`` cast to ``dtype`` (integer leaves unchanged)."""
    return jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def as_dtype(params, shardings, dtype: str):
    """``params`` with floating leaves in ``dtype`` (unchanged when they already are)."""
    if all(x.dtype == jnp.dtype(dtype) for x in jax.tree.leaves(params)
           if jnp.issubdtype(x.dtype, jnp.floating)):
        return params
    return jax.jit(lambda p: cast_floats(p, jnp.dtype(dtype)), out_shardings=shardings)(params)


def init_params(model, shardings, *, checkpoint: str = "", hf_path: str = "", seed: int = 0,
                dtype: str = ""):
    """Parameters of ``model`` in ``shardings`` from, in order of precedence: another run's
    ``checkpoint`` (its workdir; a LoRA run's base with its adapters merged in), an HF
    directory ``hf_path``, or a seeded random init; cast to ``dtype`` when given (e.g.
    'bfloat16' for a frozen reference)."""
    if checkpoint:
        from dpo_jax import lora_base

        params = lora_base.run_params(checkpoint, model, shardings)
    elif hf_path:
        from dpo_jax.models import hf

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


def create_state(params, tx: optax.GradientTransformation, mesh, shardings,
                 ref_params=None) -> TrainState:
    """A step-0 TrainState whose optimizer moments carry their parameters' shardings and whose
    scalar counters are replicated. (A moment does not depend on its parameter's values, so jit
    would not propagate the sharding by itself: FSDP would then hold every moment whole.)"""
    replicated = shard_lib.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, jax.eval_shape(tx.init, params), shardings,
        transform_non_params=lambda _: replicated)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
    return TrainState(step=step, params=params, ref_params=ref_params, opt_state=opt_state)


class Setup(NamedTuple):
    """What every task builds first: the mesh, the optimizer over ``updates`` steps, the
    parameter shardings, the initial parameters and (when asked for) the frozen reference.
    Under LoRA: the adapters' shardings, the initial adapters and the frozen base (always)."""

    mesh: Any
    tx: optax.GradientTransformation
    schedule: Callable
    shardings: Any
    params: Any
    ref_params: Any = None


def setup(rc, model, *, updates: int | None = None, init: Callable | None = None,
          reference: bool = False) -> Setup:
    """:class:`Setup` of ``model`` under a ``config.RunConfig``: the mesh of ``rc.mesh_shape``,
    ``make_optimizer(rc.optim, updates or rc.train.steps)``, shardings by ``rc.mesh_rules``,
    ``init(model, shardings, rc.param_sources)`` (default :func:`init_policy`) and, with
    ``reference``, :func:`init_reference`.

    With ``rc.lora.rank`` > 0 (``model`` a ``lora.LoraModel``): the base from ``init`` in
    ``model.param_dtype`` as the frozen ``ref_params``, and the adapters (seeded, or
    ``rc.lora.path``, a PEFT directory) as the parameters. The reference is the starting
    policy (``model.lora.reference='policy'``): with ``reference`` and adapters from
    ``rc.lora.path``, ``ref_params`` also holds a frozen copy of them under ``'lora'``
    (``lora.join`` puts the trained ones in their place for the policy); with
    ``model.lora.reference='base'`` the reference is the bare base. Raises ValueError for LoRA
    settings the run contradicts (``lora.check_run``) or a task whose model carries no
    adapters."""
    from dpo_jax import lora as lora_lib
    from dpo_jax import lora_peft
    from dpo_jax.optim import make_optimizer

    lora = getattr(rc, "lora", None)
    if lora is not None and lora.rank:
        if not isinstance(model, lora_lib.LoraModel):
            raise ValueError(f"model.lora.rank={lora.rank}: task {rc.task!r} does not train "
                             "adapters (LoRA runs: task dpo or sft); set model.lora.rank=0")
        lora_lib.check_run(rc)
    mesh = shard_lib.make_mesh(rc.mesh_shape)
    tx, schedule = make_optimizer(rc.optim, updates or rc.train.steps)
    shardings = param_shardings(model, mesh, rc.mesh_rules)
    params = (init or init_policy)(model, shardings, rc.param_sources)
    if lora is not None and lora.rank:
        base = as_dtype(params, shardings, model.cfg.param_dtype)
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
        return Setup(mesh, tx, schedule, adapter_shardings, adapters, base)
    ref_params = (init_reference(model, shardings, rc.param_sources, params) if reference
                  else None)
    return Setup(mesh, tx, schedule, shardings, params, ref_params)
