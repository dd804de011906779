"""The train state's types and the tree helpers below every runtime module: ``TrainState``
and its ``Frozen`` part, restore targets (``abstract``), casts, parameter shardings, the step-0
state (``create_state``) and a parameter tree's checksum (``param_checksum``).

Imports nothing of dpo_jax but ``sharding``: ``checkpoint``, ``step``, ``reference`` and
``lora_base`` build on it; ``state`` (parameters from their sources, ``setup``) re-exports it.
Parameters are plain nested dicts (ARCHITECTURE.md). Every tree is created directly in its
sharding (``jax.jit(..., out_shardings=...)`` or a sharded restore), never whole on one host.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
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
        """The one tree that is set: the reference's parameters as the task's model reads them
        (under LoRA the base, with the frozen initial adapters when it holds them)."""
        return self.lora_base if self.lora_base is not None else self.reference

    @staticmethod
    def tree_of(frozen: "Frozen | None"):
        """``frozen.tree``, or None when nothing is frozen."""
        return None if frozen is None else frozen.tree

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


def create_state(trainable, tx: optax.GradientTransformation, mesh, shardings,
                 frozen: Frozen | None = None) -> TrainState:
    """A step-0 TrainState training ``trainable`` (in ``shardings``) beside ``frozen`` (a
    :class:`Frozen`, e.g. ``Frozen.of(trainable, tree)``; None: nothing frozen; TypeError for
    anything else), whose optimizer moments carry their parameters' shardings and whose scalar
    counters are replicated. (A moment does not depend on its parameter's values, so jit would
    not propagate the sharding by itself: FSDP would then hold every moment whole.)"""
    if frozen is not None and not isinstance(frozen, Frozen):
        raise TypeError(f"frozen must be a Frozen or None, got {type(frozen).__name__}")
    replicated = shard_lib.replicated(mesh)
    opt_shardings = optax.tree_map_params(
        tx, lambda _, s: s, jax.eval_shape(tx.init, trainable), shardings,
        transform_non_params=lambda _: replicated)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(trainable)
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
    return TrainState(step=step, trainable=trainable, opt_state=opt_state, frozen=frozen)


def _leaf_sums(x):
    x = x.astype(jnp.float32).reshape(-1)
    w = jnp.sin(jnp.arange(x.shape[0], dtype=jnp.float32))
    return jnp.stack([x.sum(), (x * x).sum(), (x * w).sum()])


_tree_sums = jax.jit(lambda params: jax.tree.map(_leaf_sums, params))


def param_checksum(params: Any) -> list[list]:
    """Per leaf ``[dtype, shape, sum x, sum x^2, sum x*sin(i)]`` (sums in float32, computed on
    device, rounded to 6 decimals).

    A cheap stand-in for hashing every byte (which would move the whole model to the host): the
    third sum depends on the position of each value, so permutations change it too."""
    sums = jax.device_get(_tree_sums(params))
    return [[str(x.dtype), list(x.shape)] + np.asarray(s).round(6).tolist()
            for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(sums))]
