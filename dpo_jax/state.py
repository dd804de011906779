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
    params: Any
    ref_params: Any  # None when the loss is reference-free or reference log-probs are precomputed
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


def init_params(model, shardings, *, checkpoint: str = "", hf_path: str = "", seed: int = 0,
                dtype: str = ""):
    """Parameters of ``model`` in ``shardings`` from, in order of precedence: another run's
    ``checkpoint`` (its workdir), an HF directory ``hf_path``, or a seeded random init; cast to
    ``dtype`` when given (e.g. 'bfloat16' for a frozen reference)."""
    if checkpoint:
        from dpo_jax import checkpoint as ckpt_lib

        params = ckpt_lib.restore_params(checkpoint, abstract(model.abstract_params(), shardings))
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
    parameter shardings, the initial parameters and (when asked for) the frozen reference."""

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
    ``init(model, shardings, rc.sources)`` (default :func:`init_policy`) and, with
    ``reference``, :func:`init_reference`."""
    from dpo_jax.optim import make_optimizer

    mesh = shard_lib.make_mesh(rc.mesh_shape)
    tx, schedule = make_optimizer(rc.optim, updates or rc.train.steps)
    shardings = param_shardings(model, mesh, rc.mesh_rules)
    params = (init or init_policy)(model, shardings, rc.sources)
    ref_params = init_reference(model, shardings, rc.sources, params) if reference else None
    return Setup(mesh, tx, schedule, shardings, params, ref_params)
