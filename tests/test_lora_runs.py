"""LoRA runs end to end (dpo_jax/lora.py through the DPO and SFT tasks): exact resume from
checkpoints that hold only the adapters, their optimizer state and the base's fingerprint; a
changed base is refused; the two-stage recipe (SFT adapters merged into DPO's base)."""

import math

import jax
import numpy as np
import pytest

from dpo_jax import checkpoint as ckpt_lib
from dpo_jax import lora as lora_lib
from dpo_jax import lora_base
from dpo_jax import state as state_lib
from dpo_jax.config import read_config
from dpo_jax.models import Model, model_config_from
from dpo_jax.models.hf import save_hf
from dpo_jax.step import StepConfig, pair_terms
from dpo_jax.workdir import WorkdirError
from tests import helpers, runs
from tests.runs import with_lora


@pytest.mark.parametrize("task,quant", [pytest.param("dpo", "none", marks=pytest.mark.slow),
                                        pytest.param("dpo", "nf4", marks=pytest.mark.slow),
                                        pytest.param("sft", "none", marks=pytest.mark.slow)])
def test_interrupted_lora_run_ends_as_the_uninterrupted_one(tmp_path, task, quant):
    """With adapter dropout (masks drawn from the step), killed after step 3 (checkpoint at 2):
    the rerun ends with the same adapters, bit for bit, and the same metrics log; also over an
    NF4 base (QLoRA, ``model.lora.base_quant``), whose rerun with another quantisation is
    refused."""
    config = with_lora(runs.CONFIGS[task](steps=4, checkpoint_every=2), dropout=0.1,
                       base_quant=quant)
    _, summary, _ = runs.resume_matches_full_run(config, tmp_path, 3, resumed_from=2)
    # a checkpoint holds the adapters and the base's fingerprint, not the base
    fingerprint = ckpt_lib.restore_json_item(str(tmp_path / "full"), lora_base.ITEM)
    assert fingerprint["source"]["seed"] == 0 and len(fingerprint["checksum"]) > 0
    assert set(runs.final_params(config, tmp_path / "full")) == {"lora"}
    assert summary["first_train"]["loss"] != summary["final_train"]["loss"]
    if quant != "none":
        config.model.lora.base_quant = "int8"
        with pytest.raises(WorkdirError, match=f"model.lora.base_quant: '{quant}' -> 'int8'"):
            runs.run(config, tmp_path / "full")


def test_resume_refuses_a_changed_base(tmp_path):
    """The base comes from an HF directory whose weights are replaced between the crash and
    the rerun: the resume stops, naming the checksum, instead of training the adapters on
    another model."""
    config = with_lora(runs.dpo_config(steps=2, checkpoint_every=1))
    cfg = model_config_from(config.model)
    model = Model(cfg)
    src = tmp_path / "base"
    save_hf(str(src), cfg, jax.device_get(jax.jit(model.init)(jax.random.key(0))))
    config.model.hf_path = str(src)
    with pytest.raises(Exception, match="interrupted"):
        runs.run(config, tmp_path / "run", interrupt_after=2)
    save_hf(str(src), cfg, jax.device_get(jax.jit(model.init)(jax.random.key(1))))
    with pytest.raises(ValueError, match="checksum differs"):
        runs.run(config, tmp_path / "run")


@pytest.mark.slow  # two whole runs
def test_two_stage_recipe_sft_adapters_merged_into_the_dpo_base(tmp_path):
    """SFT with LoRA, then DPO with ``init.policy`` = the SFT run: the SFT adapters are merged
    into the base, which is DPO's reference (full fine-tuning: its initial policy too; new
    adapters: their base), where DPO starts at loss ln 2. The SFT base, trained on in
    bfloat16, is rebuilt as it was, then merged in DPO's float32."""
    sft = with_lora(runs.sft_config(steps=2))
    sft.model.param_dtype = "bfloat16"  # the SFT base in bfloat16; DPO's model in float32
    runs.run(sft, tmp_path / "sft")
    sft_rc = read_config(sft)
    sft_model = lora_lib.LoraModel(sft_rc.model, sft_rc.lora)
    seed_base = state_lib.cast_floats(jax.jit(sft_model.init)(jax.random.key(0)), np.float32)
    want = jax.device_get(lora_lib.merge(sft_model, seed_base,
                                         runs.final_params(sft, tmp_path / "sft")))
    assert not np.allclose(want["layers"]["attn"]["q"], seed_base["layers"]["attn"]["q"])

    for rank in (0, 8):  # full fine-tuning from the merged SFT model; new adapters stacked on it
        dpo = with_lora(runs.dpo_config(steps=1), rank=rank)
        dpo.init.policy = str(tmp_path / "sft")
        rc = read_config(dpo)
        model = lora_lib.make_model(rc.model, rc.lora)
        setup = state_lib.setup(rc, model, reference=True)
        base = setup.frozen.lora_base if rank else setup.trainable
        for got, w in zip(jax.tree.leaves(jax.device_get(base)), jax.tree.leaves(want),
                          strict=True):
            np.testing.assert_allclose(got, w, rtol=1e-6, atol=1e-6)
        if rank:  # step 0: the adapted policy is its base, the reference
            loss_cfg = helpers.loss_config(beta=0.5)
            b = helpers.pair_batch(helpers.synthetic_pairs(8))
            _, out = pair_terms(model, loss_cfg, setup.trainable, setup.frozen.lora_base, b,
                                StepConfig(), None)
            np.testing.assert_allclose(np.asarray(out.losses), math.log(2.0), rtol=1e-6)


@pytest.mark.parametrize("base_quant", [pytest.param("none", marks=pytest.mark.slow), "nf4"])
def test_lora_run_with_stored_reference_logps(base_quant, tmp_path):
    """``logprobs.precompute_reference``: the base's log-probs (of the float base, or of the
    NF4-quantised one: QLoRA) are computed once and stored; the state keeps the base for the
    policy's forward, and step 1 is at loss ln 2."""
    config = with_lora(runs.dpo_config(steps=2), base_quant=base_quant)
    config.logprobs.precompute_reference = True
    summary = runs.run(config, tmp_path)
    np.testing.assert_allclose(summary["first_train"]["loss"], math.log(2.0), rtol=1e-6)
    assert (tmp_path / "reference_logps").is_dir()
    assert summary["final_train"]["loss"] < summary["first_train"]["loss"]
