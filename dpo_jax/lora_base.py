"""The frozen base of a LoRA run (``dpo_jax/lora.py``): the run settings that contradict it
(``check_run``), its fingerprint in every checkpoint (checked on resume) and another run's LoRA
settings. Rebuilding another run's base and merging
its adapters (``init.policy``, export) is ``state.run_base_and_adapters`` / ``state.run_params``,
beside the parameter sources it recurses into.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from dpo_jax.lora import LoraConfig, read_lora
from dpo_jax.train_state import param_checksum

ITEM = "lora_base"  # the checkpoint item holding the base's fingerprint


class BaseFingerprint:
    """The ``lora_base`` checkpoint item: where the frozen base came from and a checksum of its
    values (per leaf: dtype, shape and three float32 sums, ``reference.param_checksum``).
    Restoring it into a run whose base differs raises ValueError, so adapters are never resumed
    on another base."""

    def __init__(self, base, source: Mapping[str, Any]):
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


def check_run(rc) -> None:
    """Refuse settings that contradict a LoRA policy (``rc`` a ``config.RunConfig``): a reference
    model of its own (the reference is the starting policy or the base, ``model.lora.reference``),
    a reference dtype other than the base's, and TR-DPO (which would move the reference, i.e.
    the frozen base)."""
    if not rc.lora.rank:
        return
    s = rc.param_sources
    if s.reference or s.reference_hf:
        which = (f"init.reference={s.reference!r}" if s.reference
                 else f"model.ref_hf_path={s.reference_hf!r}")
        raise ValueError(
            f"model.lora.rank={rc.lora.rank} with {which}: under LoRA the reference is the "
            "starting policy (or, with model.lora.reference='base', the base with the adapters "
            "off), so a separate reference model is ambiguous. Unset it (the base comes from "
            "init.policy or model.hf_path), or set model.lora.rank=0 to fine-tune all "
            "parameters against that reference")
    if s.reference_dtype and s.reference_dtype != rc.model.param_dtype:
        raise ValueError(
            f"model.ref_param_dtype={s.reference_dtype!r} with LoRA: the reference is the base, "
            f"stored in model.param_dtype={rc.model.param_dtype!r}; set that one instead and "
            "leave model.ref_param_dtype=''")
    if rc.step.ref_sync_every:
        raise ValueError("train.ref_sync_every > 0 (TR-DPO) moves the reference, which under "
                         "LoRA is the frozen base; set train.ref_sync_every=0 or "
                         "model.lora.rank=0")


def host_states(state, sources) -> dict:
    """``{'lora_base': BaseFingerprint}`` for ``loop.train(host_states=...)`` when ``state``
    is a LoRA state (``sources``: the base's ``config.ParamSources``), else ``{}``."""
    if state.frozen is None or state.frozen.lora_base is None:
        return {}
    return {ITEM: BaseFingerprint(state.frozen.lora_base, source_of(sources))}


def source_of(sources) -> dict:
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
