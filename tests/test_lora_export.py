"""Export of a LoRA run (dpo_jax/export.py, dpo_jax/lora.py): the merged model loads in
``transformers`` with the run's logits, the PEFT adapter directory loads onto the base with
``peft`` with the same logits, and the PEFT directory imports back as the initial adapters."""

import numpy as np
import pytest

from dpo_jax import lora as lora_lib
from dpo_jax import state as state_lib
from dpo_jax.config import read_config
from dpo_jax.data.testing import gpt2_style_tokenizer
from dpo_jax.export import export_run
from tests import runs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = {"rtol": 1e-4, "atol": 1e-4}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny Llama (untied LM head) as an HF directory, and a 2-step LoRA DPO run on it that
    adapts every projection and the LM head."""
    tmp = tmp_path_factory.mktemp("lora_export")
    # export copies the run's tokenizer; the embedding covers it
    _, config = runs.lora_llama_run(tmp, gpt2_style_tokenizer(), rms_norm_eps=1e-5)
    return tmp, config


def _ours(config, workdir):
    """Logits of the run's adapted policy on fixed token ids, and its adapters."""
    model, policy, adapters = runs.lora_policy(config, workdir)
    ids = np.random.default_rng(0).integers(1, 128, (2, 12)).astype(np.int32)
    pos = np.broadcast_to(np.arange(12, dtype=np.int32), ids.shape)
    logits = model.logits(policy, ids, pos, np.ones_like(ids))
    return ids, np.asarray(logits), adapters


def _torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def test_merged_model_and_peft_adapters_give_the_runs_logits(trained):
    tmp, config = trained
    out = export_run(str(tmp / "run"), str(tmp / "out"))
    ids, want, _ = _ours(config, tmp / "run")
    base_logits = _torch_logits(
        transformers.AutoModelForCausalLM.from_pretrained(tmp / "base").eval(), ids)
    assert np.abs(base_logits - want).max() > 1e-3  # the adapters changed the model
    merged = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_allclose(_torch_logits(merged, ids), want, **TOL)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp / "base").eval()
    adapted = peft.PeftModel.from_pretrained(base, str(tmp / "out" / "adapter")).eval()
    np.testing.assert_allclose(_torch_logits(adapted, ids), want, **TOL)


def test_peft_directory_imports_as_the_initial_adapters(trained):
    tmp, config = trained
    adapter_dir = tmp / "out_import" / "adapter"
    export_run(str(tmp / "run"), str(tmp / "out_import"))
    _, _, want = _ours(config, tmp / "run")
    config = runs.dpo_config()
    config.model.hf_path = str(tmp / "base")
    config.model.lora.update(rank=4, alpha=8.0, targets="all,lm_head", path=str(adapter_dir))
    rc = read_config(config)
    setup = state_lib.setup(rc, lora_lib.make_model(rc.model, rc.lora), reference=True)
    runs.assert_same_params(setup.trainable, want)
    config.model.lora.alpha = 16.0
    rc = read_config(config)
    with pytest.raises(ValueError, match="lora_alpha=8.0.*alpha=16.0"):
        state_lib.setup(rc, lora_lib.make_model(rc.model, rc.lora), reference=True)
