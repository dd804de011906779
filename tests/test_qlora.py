"""QLoRA runs (``model.lora.base_quant``, dpo_jax/models/quant.py): the state holds the
quantised base, sharded like the float base, and a step on 8 devices equals one device's; a run
resumes exactly (``test_lora_runs.py``) and with stored reference log-probs starts at ln 2; the export merges the
adapters into the dequantised base (transformers' logits = the run's) and its PEFT directory
names the quantisation."""

import dataclasses
import importlib.util
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import lora as lora_lib
from dpo_jax import lora_peft
from dpo_jax import state as state_lib
from dpo_jax.config import read_config
from dpo_jax.export import export_run
from dpo_jax.models import Model, quant
from dpo_jax.models.local import SMOLLM2, find_local_model
from tests import helpers, runs
from tests.runs import with_lora


@pytest.mark.parametrize("kind", ["nf4", pytest.param("int8", marks=pytest.mark.slow)])
def test_step_on_eight_devices_equals_one_and_the_base_is_sharded(kind):
    model = lora_lib.LoraModel(helpers.tiny_model_config(),
                               lora_lib.LoraConfig(rank=4, base_quant=kind))
    base = helpers.init_params(model)
    adapters = helpers.perturbed(jax.jit(model.init_adapters)(jax.random.key(0)), 0.05, 1)
    got = helpers.assert_qlora_step_on_mesh_equals_one_device(
        model, model, base, adapters, helpers.mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    codes = got[2].frozen.lora_base["layers"]["attn"]["q"]["codes"]
    assert codes.dtype == (np.uint8 if kind == "nf4" else np.int8)
    spec = jax.tree.leaves(tuple(codes.sharding.spec))
    assert "fsdp" in spec and "tensor" in spec  # embed -> fsdp, heads -> tensor, as the base
    assert abs(got[1]["loss"] - math.log(2.0)) > 1e-4  # the adapters moved the policy


def test_export_merges_into_the_dequantised_base_and_names_the_quantisation(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = with_lora(runs.dpo_config(steps=2), base_quant="nf4")
    config.model.preset = "tiny-llama"  # q, k, v as separate tensors in HF (PEFT modules)
    runs.run(config, tmp_path / "run")
    out = export_run(str(tmp_path / "run"), str(tmp_path / "out"))
    rc = read_config(config)
    model = lora_lib.LoraModel(rc.model, rc.lora)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    _, base, adapters = state_lib.run_base_and_adapters(
        str(tmp_path / "run"), model, jax.tree.map(lambda _: one, model.abstract_params()))
    assert base["layers"]["mlp"]["up"]["codes"].dtype == np.uint8  # rebuilt quantised
    ids = np.random.default_rng(0).integers(1, 128, (2, 12)).astype(np.int32)
    pos = np.broadcast_to(np.arange(12, dtype=np.int32), ids.shape)
    want = np.asarray(model.logits(lora_lib.join(base, adapters), ids, pos, np.ones_like(ids)))
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        got = merged(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    with open(tmp_path / "out" / "adapter" / lora_peft.BASE_QUANT_CONFIG) as f:
        q = json.load(f)
    bnb = transformers.BitsAndBytesConfig.from_dict(q)
    assert bnb.load_in_4bit and bnb.bnb_4bit_quant_type == "nf4"
    assert bnb.bnb_4bit_use_double_quant and q["llm_int8_skip_modules"] == ["lm_head"]
    back = lora_peft.load_peft(str(tmp_path / "out" / "adapter"), model,
                               jax.tree.map(lambda _: one, model.abstract_adapters()))
    runs.assert_same_params(back, runs.final_params(config, tmp_path / "run"))


@pytest.mark.slow  # SmolLM2-135M forwards on the CPU; skips without the model directory
def test_smollm2_logprob_errors_script():
    """experiments/qlora/logprob_error.py on 4 held-out HH pairs: its NF4 log-probs are the
    plain model's on the dequantised weights (float64 log-softmax of ``Model.logits`` over the
    pair's own tokens), the bfloat16 base differs from itself by 0, int8 by less than NF4."""
    if find_local_model(SMOLLM2) is None:
        pytest.skip(f"{SMOLLM2} not found (bash ../shared/models/smollm2.sh)")
    path = pathlib.Path(__file__).parents[1] / "experiments" / "qlora" / "logprob_error.py"
    spec = importlib.util.spec_from_file_location("logprob_error", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out, logps, items, f32 = script.measure(4, 4)
    v = out["variants"]
    assert v["bfloat16"]["mean_abs_dlogp_per_seq"] == 0.0
    assert 0 < v["int8"]["mean_abs_dlogp_per_token"] < v["nf4"]["mean_abs_dlogp_per_token"]
    assert all(0.05 < e["nf4"] < 0.15 and 0.003 < e["int8"] < 0.02
               for e in out["weight_rel_error"].values())
    rc = read_config(script.hh.get_config("smollm2"))
    cfg = dataclasses.replace(rc.model, dtype="float32", param_dtype="float32", remat="none")
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), f32)
    qbase = quant.quantize_tree(cfg, "nf4", bf16)
    w = quant.dequantize_tree(cfg, "nf4", qbase, Model(cfg).abstract_params(), jnp.float32)
    pair = items[0]
    ids = np.concatenate([pair["prompt"], pair["chosen"]]).astype(np.int32)[None]
    logits = np.asarray(Model(cfg).logits(w, ids, np.arange(ids.shape[1])[None],
                                          np.ones_like(ids)), np.float64)[0]
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    n = len(pair["prompt"])
    want = sum(logp[t - 1, ids[0, t]] for t in range(n, ids.shape[1]))
    np.testing.assert_allclose(logps["nf4"][0, 0], want, rtol=1e-4)
