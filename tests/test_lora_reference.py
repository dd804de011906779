"""A LoRA run started from adapters (model.lora.path, a PEFT directory such as an SFT run's):
its reference is the starting policy (base + those adapters, held frozen beside the base), so
DPO starts at loss ln 2 with rewards 0; model.lora.reference='base' keeps the bare base."""

import math

import jax
import numpy as np
import pytest

from dpo_jax import lora as lora_lib
from dpo_jax import lora_peft
from dpo_jax import state as state_lib
from dpo_jax.config import read_config
from dpo_jax.models import Model
from dpo_jax.step import StepConfig, pair_terms
from tests import helpers, runs
from tests.runs import with_lora


def _start_adapters(config, path, seed=5, scale=0.3):
    """A PEFT directory of nonzero adapters (as an SFT run would leave), for ``config``'s
    model; returns the adapters written."""
    rc = read_config(config)
    model = lora_lib.LoraModel(rc.model, rc.lora)
    adapters = jax.device_get(jax.jit(model.init_adapters)(jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    adapters = jax.tree.map(lambda x: np.asarray(x, np.float32), adapters)
    for ab in adapters["lora"].values():
        ab["b"] = (scale * rng.standard_normal(ab["b"].shape)).astype(np.float32)
    lora_peft.save_peft(str(path), model, adapters)
    return adapters


def _config(tmp_path, reference="policy", **train):
    """A tiny Llama (its projections are PEFT modules of their own; GPT-2 fuses q, k, v)."""
    config = with_lora(runs.dpo_config(**train), rank=4)
    config.model.preset = "tiny-llama"
    config.model.overrides.update(vocab_size=128, max_len=64)
    _start_adapters(config, tmp_path / "peft")
    config.model.lora.update(path=str(tmp_path / "peft"), reference=reference)
    return config


def _dpo_numpy(policy_logits, ref_logits, batch, beta):
    """The sigmoid DPO loss per pair from two models' logits, in float64, by the paper."""
    def seq_logps(logits):
        lp = logits.astype(np.float64)
        lp = lp - np.log(np.exp(lp - lp.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - lp.max(-1, keepdims=True)
        ids = batch["input_ids"][:, 1:]
        tok = np.take_along_axis(lp[:, :-1], ids[..., None], -1)[..., 0]
        return (tok * batch["loss_mask"][:, 1:]).sum(1)

    pol, ref = seq_logps(policy_logits), seq_logps(ref_logits)
    B = len(pol) // 2
    margin = beta * ((pol[:B] - ref[:B]) - (pol[B:] - ref[B:]))
    return np.log1p(np.exp(-margin))


@pytest.mark.parametrize("reference", ["policy", "base"])
def test_reference_of_a_run_started_from_a_peft_adapter(tmp_path, reference):
    config = _config(tmp_path, reference)
    rc = read_config(config)
    model = lora_lib.make_model(rc.model, rc.lora)
    setup = state_lib.setup(rc, model, reference=True)
    base = jax.device_get(jax.jit(Model(rc.model).init)(jax.random.key(0)))
    start = jax.tree.map(np.asarray, _start_adapters(config, tmp_path / "again"))
    # The state: the adapters trained, the base unmerged, the initial adapters frozen beside it
    # (policy) or absent (base).
    ref = jax.device_get(setup.frozen.lora_base)
    assert set(ref) == set(base) | ({"lora"} if reference == "policy" else set())
    for got, want in zip(jax.tree.leaves({k: ref[k] for k in base}), jax.tree.leaves(base),
                         strict=True):
        np.testing.assert_array_equal(got, want)
    runs.assert_same_params(jax.device_get(setup.trainable), start)
    if reference == "policy":
        runs.assert_same_params({"lora": ref["lora"]}, start)

    pairs = helpers.synthetic_pairs(8, seed=2)
    batch = helpers.pair_batch(pairs)
    loss_cfg = helpers.loss_config(beta=0.5)
    _, out = pair_terms(model, loss_cfg, setup.trainable, setup.frozen.lora_base, batch, StepConfig(),
                        None)
    merged = Model(lora_lib.merged_config(model))
    policy_logits = np.asarray(merged.logits(
        lora_lib.merge(model, base, start), batch["input_ids"], batch["positions"],
        batch["segment_ids"]))
    if reference == "policy":  # the starting policy: ln 2 and rewards 0, exactly
        np.testing.assert_array_equal(np.asarray(out.losses), np.float32(math.log(2.0)))
        np.testing.assert_array_equal(np.asarray(out.chosen_rewards), 0.0)
        np.testing.assert_array_equal(np.asarray(out.rejected_rewards), 0.0)
    else:  # the bare base: the merged adapted model against the base's own logits
        base_logits = np.asarray(Model(rc.model).logits(base, batch["input_ids"],
                                                        batch["positions"],
                                                        batch["segment_ids"]))
        want = _dpo_numpy(policy_logits, base_logits, batch, 0.5)
        np.testing.assert_allclose(np.asarray(out.losses), want, rtol=2e-4, atol=2e-5)
        assert np.abs(want - math.log(2.0)).max() > 1e-3  # the option differs from the start


@pytest.mark.slow  # 18 s cold; the step-level test above pins ln 2 and rewards 0 in the suite
def test_run_from_a_peft_adapter_starts_at_ln2_and_resumes_exactly(tmp_path):
    config = _config(tmp_path, steps=4, checkpoint_every=2)
    full, _, _ = runs.resume_matches_full_run(config, tmp_path, 3, resumed_from=2)
    first = full["first_train"]
    # Through the jitted train step the policy's forward (training tiling) and the reference's
    # (forward-only) round differently in the last bits: 0 up to float32 rounding.
    np.testing.assert_allclose(first["loss"], math.log(2.0), rtol=1e-6)
    assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6
    assert full["final_train"]["loss"] != first["loss"]
    # model.lora.reference='base': the old objective (the bare base as the reference).
    base = _config(tmp_path, "base", steps=1)
    first_base = runs.run(base, tmp_path / "base")["first_train"]
    assert abs(first_base["loss"] - math.log(2.0)) > 1e-4
    assert abs(first_base["rewards/chosen"]) > 1e-4  # 100x the rounding above


def test_reference_option_is_checked():
    config = with_lora(runs.dpo_config())
    config.model.lora.reference = "merged"
    with pytest.raises(ValueError, match="model.lora.reference='merged'"):
        read_config(config)
