"""The frozen base of a LoRA run (``dpo_jax/lora.py``): its fingerprint in every checkpoint
(checked on resume) and, for another run given as ``init.policy`` or exported, its base rebuilt
from that run's own sources with the checkpoint's adapters, merged.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpo_jax.lora import LoraConfig, LoraModel, merge, merged_config, read_lora
from dpo_jax.models import Model

ITEM = "lora_base"  # the checkpoint item holding the base's fingerprint


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
    if state.frozen is None or state.frozen.lora_base is None:
        return {}
    return {ITEM: BaseFingerprint(state.frozen.lora_base, _source(sources))}


def _source(sources) -> dict:
    """Where a base comes from (a ``config.ParamSources``), as the fingerprint records it."""
    return {"policy": sources.policy, "policy_hf": sources.policy_hf, "seed": sources.seed}


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
    base = state_lib.init_policy(lora_model, shardings, rc.param_sources)
    base = state_lib.as_dtype(base, shardings, rc.model.param_dtype)
    one = jax.tree.leaves(shardings)[0]
    rep = jax.sharding.NamedSharding(one.mesh, jax.sharding.PartitionSpec()) if isinstance(
        one, jax.sharding.NamedSharding) else one
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                        lora_model.abstract_adapters())
    adapters = ckpt_lib.restore_params(run_dir, like, step=step)
    saved = ckpt_lib.restore_json_item(run_dir, ITEM, step=step)
    if saved is not None:
        BaseFingerprint(base, _source(rc.param_sources)).load_state_dict(saved)
    return lora_model, base, adapters


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


