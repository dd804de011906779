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
class Frozen:
    """The parameters a step reads but does not train, by what they are (at most one is set):

    * ``reference``: the reference policy of full fine-tuning (DPO's pi_ref, PPO's KL anchor;
      TR-DPO updates it);
    * ``lora_base``: under LoRA (``dpo_jax/lora.py``) the frozen base, the policy's weights
      under its adapters, plus (reference = the starting policy, adapters from
      ``model.lora.path``) a frozen copy of the initial adapters under ``'lora'``; the
      reference is derived from it (``lora.join``).
    """

    reference: Any = None
    lora_base: Any = None

    @property
    def tree(self):
        """The one tree that is set (the checkpoint item ``ref_params`` of TR-DPO)."""
        return self.lora_base if self.lora_base is not None else self.reference

    @classmethod
    def of(cls, trainable, tree) -> "Frozen | None":
        """``tree`` named by what it is beside ``trainable``: the LoRA base when ``trainable``
        is an adapter tree (``{'lora': ...}`` only, ``lora.join``'s rule), else the reference;
        None for None."""
        if tree is None:
            return None
        if isinstance(trainable, dict) and set(trainable) == {"lora"}:
            return cls(lora_base=tree)
        return cls(reference=tree)


@flax.struct.dataclass
class TrainState:
    """What a train step carries from one update to the next. Holds no RNG key: a step's keys
    derive from a seed and ``step`` (``lora.step_rng``, PPO's minibatch order)."""

    step: jax.Array  # int32 [], replicated: optimizer updates applied so far
    trainable: Any  # what the optimizer updates: the whole policy, or its adapters under LoRA
    opt_state: Any  # the optimizer's state of ``trainable``, in its shardings
    frozen: Frozen | None = None  # None: nothing frozen (reference-free loss, stored reference)

    # The checkpoint's item names (``params``, ``ref_params``), read-only.
    @property
    def params(self):
        """``trainable``."""
        return self.trainable

    @property
    def ref_params(self):
        """The frozen tree (``frozen.tree``: the reference, or the LoRA base) or None."""
        return None if self.frozen is None else self.frozen.tree

    def with_reference(self, reference) -> "TrainState":
        """This state with the reference replaced (TR-DPO's sync; a restored ``ref_params``
        checkpoint item). ValueError when it holds no reference (none, or a LoRA base)."""
        if self.frozen is None or self.frozen.reference is None:
            raise ValueError("this state holds no reference parameters to replace")
        return self.replace(frozen=self.frozen.replace(reference=reference))


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
    """A step-0 TrainState training ``params`` beside the frozen ``ref_params``
    (:meth:`Frozen.of` names it: the LoRA base when ``params`` are adapters, else the
    reference; None: nothing frozen), whose optimizer moments carry their parameters' shardings
    and whose scalar counters are replicated. (A moment does not depend on its parameter's
    values, so jit would not propagate the sharding by itself: FSDP would then hold every moment
    whole.)"""
    replicated = shard_lib.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, jax.eval_shape(tx.init, params), shardings,
        transform_non_params=lambda _: replicated)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
    return TrainState(step=step, trainable=params, opt_state=opt_state,
                      frozen=Frozen.of(params, ref_params))


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
