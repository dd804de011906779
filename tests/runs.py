"""Task-level test helpers: tiny configs of every task, a run's final parameters and logs.

End-to-end tests call a task's ``train_and_evaluate(config, workdir)`` on these configs; step
tests use ``tests/helpers.py`` instead.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from dpo_jax import checkpoint as ckpt_lib
from dpo_jax import loop
from dpo_jax import lora as lora_lib
from dpo_jax import state as state_lib
from dpo_jax.config import base_config, read_config
from dpo_jax.metrics import read_records
from dpo_jax.models import Model, model_config_from
from dpo_jax.ppo.config import default_ppo_config
from dpo_jax.reward_model import RewardModel
from dpo_jax.sft import add_sft_config
from dpo_jax.tasks import get_task


def tiny(c, steps: int = 4, batch_size: int = 16, **train):
    """A 1-layer d_model-32 model, ``steps`` of ``batch_size``, synchronous checkpoints only at
    the end, a metrics record every step, small synthetic splits."""
    c.update_from_flattened_dict({
        "model.overrides.n_layer": 1, "model.overrides.d_model": 32, "model.overrides.d_ff": 64,
        "data.synthetic.num_train": 128, "data.synthetic.num_eval": 32, "data.buckets": "32"})
    c.train.update({"steps": steps, "batch_size": batch_size, "eval_batch_size": 16,
                    "eval_every": 0, "log_every": 1, "checkpoint_every": 0,
                    "async_checkpointing": False, **train})
    return c


def dpo_config(**train):
    return tiny(base_config(), **train)


def format_config(data_format: str, loss: str, **train):
    """A tiny DPO config on ``data.format=data_format`` (ranked lists, unpaired examples)
    trained with the loss ``loss`` that reads it."""
    c = dpo_config(**train)
    c.data.format, c.loss.name = data_format, loss
    return c


def sft_config(**train):
    return tiny(add_sft_config(base_config()), **train)


def reward_config(**train):
    c = tiny(base_config(), **train)
    c.task = "reward"
    return c


def ppo_config(**train):
    c = tiny(base_config(), **train)
    c.task = "ppo"
    c.ppo = default_ppo_config()
    c.ppo.update(reward="synthetic", max_new_tokens=4, max_prompts=64, epochs=1, minibatches=2,
                 adaptive_kl=True, target_kl=0.5, kl_horizon=64)
    c.optim.max_grad_norm = 1.0
    return c


CONFIGS = {"dpo": dpo_config, "sft": sft_config, "reward": reward_config, "ppo": ppo_config}


def run(config, workdir, **kwargs) -> dict:
    """The task ``config.task`` names, run in ``workdir``; its summary."""
    return get_task(config.task)(config, str(workdir), **kwargs)


def cut_and_resume(config, workdir, interrupt_after: int, **kwargs) -> dict:
    """``config`` run in ``workdir`` until it is interrupted after step ``interrupt_after``
    (``loop.Interrupted``, asserted), then run again there; the rerun's summary."""
    with pytest.raises(loop.Interrupted):
        run(config, workdir, interrupt_after=interrupt_after, **kwargs)
    return run(config, workdir, **kwargs)


def final_params(config, workdir, step: int | None = None):
    """The trained parameters of ``workdir``'s newest (or ``step``'s) checkpoint, on one
    device: the model's, or a LoRA run's adapters (``model.lora.rank`` > 0)."""
    if config.model.lora.get("rank", 0):
        rc = read_config(config)
        abstract = lora_lib.LoraModel(rc.model, rc.lora).abstract_adapters()
    else:
        cfg = model_config_from(config.model)
        model = RewardModel(Model(cfg)) if config.task in ("reward", "ppo") else Model(cfg)
        abstract = model.abstract_params()
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    like = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), abstract)
    return ckpt_lib.restore_params(str(workdir), like, step=step)


def records(workdir) -> list[dict]:
    """The metric records of the run in ``workdir`` (``metrics.jsonl``)."""
    return read_records(os.path.join(workdir, "metrics.jsonl"))


def assert_same_params(a, b) -> None:
    for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def without_timing(recs: list[dict]) -> list[dict]:
    """Metric records without wall-clock fields (they differ between any two runs)."""
    drop = ("tokens_per_s", "iteration_s")
    return [{k: v for k, v in r.items() if k not in drop} for r in recs]


def assert_same_run(config, got, want) -> list[dict]:
    """The runs of ``config`` in workdirs ``got`` and ``want`` ended with bit-identical
    parameters and the same metric log (wall-clock fields aside); ``want``'s records without
    those fields."""
    assert_same_params(final_params(config, got), final_params(config, want))
    want_records = without_timing(records(want))
    assert without_timing(records(got)) == want_records
    return want_records


def resume_matches_full_run(config, workdir, interrupt_after: int, resumed_from: int):
    """``config`` run uninterrupted in ``workdir/'full'`` and, in ``workdir/'cut'``,
    interrupted after step ``interrupt_after`` and rerun: the rerun resumed from step
    ``resumed_from`` and ended as the uninterrupted run did (:func:`assert_same_run`).
    ``(full run's summary, rerun's summary, full run's records without wall-clock fields)``."""
    full = run(config, workdir / "full")
    summary = cut_and_resume(config, workdir / "cut", interrupt_after)
    assert summary["resumed_from"] == resumed_from
    return full, summary, assert_same_run(config, workdir / "cut", workdir / "full")


# ----------------------------------------------------------------------------- LoRA runs


def with_lora(config, rank=4, **lora):
    """``config`` with LoRA adapters of ``rank`` (``model.lora`` fields ``lora``), lr 1e-2."""
    config.model.lora.update(rank=rank, **lora)
    config.optim.lr = 1e-2
    return config


def lora_llama_run(tmp, tok, **llama_fields):
    """A tiny Llama (1 layer, untied LM head, seeded torch init; ``llama_fields`` add
    ``LlamaConfig`` fields) saved with ``tok`` as the HF directory ``tmp/'base'``, and a 2-step
    LoRA DPO run on it adapting every projection and the LM head in ``tmp/'run'``. The torch
    base model and the run's config. (torch and transformers: imported here, only the HF
    tests need them.)"""
    import torch
    import transformers

    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, **llama_fields)).eval()
    base.save_pretrained(tmp / "base")
    tok.save_pretrained(tmp / "base")
    config = dpo_config(steps=2)
    config.model.hf_path = str(tmp / "base")
    config.model.lora.update(rank=4, alpha=8.0, targets="all,lm_head")
    config.optim.lr = 1e-2
    run(config, tmp / "run")
    return base, config


def lora_policy(config, workdir):
    """``(LoraModel, policy, adapters)`` of the LoRA run of ``config`` in ``workdir``, on one
    device: its base rebuilt from its sources (``state.run_base_and_adapters``) and its newest
    adapters; ``policy`` the two joined (``lora.join``)."""
    rc = read_config(config)
    model = lora_lib.LoraModel(rc.model, rc.lora)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: one, model.abstract_params())
    _, base, adapters = state_lib.run_base_and_adapters(str(workdir), model, shardings)
    return model, lora_lib.join(base, adapters), adapters
