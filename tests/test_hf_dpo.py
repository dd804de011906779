"""DPO from Hugging Face checkpoints end to end: policy and reference from different HF
directories, log-probs checked against PyTorch, then export back to HF and reload."""

import json

import jax
import numpy as np
import pytest

from dpo_jax import loop, preference_data
from dpo_jax import losses as losses_lib
from dpo_jax import sharding as shard_lib
from dpo_jax import state as state_lib
from dpo_jax.config import base_config, read_config
from dpo_jax.data.testing import gpt2_style_tokenizer
from dpo_jax.models import Model
from dpo_jax.step import make_eval_step
from dpo_jax.train_state import Frozen
from tests import runs

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

jax.config.update("jax_default_matmul_precision", "highest")


def _hf_gpt2(path, vocab_size, eos_id, seed):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=vocab_size,
                                  bos_token_id=eos_id, eos_token_id=eos_id,
                                  n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(path)
    return model


def _torch_seq_logps(model, input_ids, loss_mask):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(input_ids, dtype=torch.long)).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1)
    tok = torch.gather(logp, 2, torch.tensor(input_ids[:, 1:], dtype=torch.long)[..., None])[..., 0]
    return (tok.numpy() * loss_mask[:, 1:]).sum(1)


@pytest.fixture
def hf_setup(tmp_path):
    tok = gpt2_style_tokenizer()
    tok_dir = tmp_path / "tok"
    tok.save_pretrained(tok_dir)
    policy = _hf_gpt2(tmp_path / "policy", len(tok), tok.eos_token_id, seed=0)
    reference = _hf_gpt2(tmp_path / "reference", len(tok), tok.eos_token_id, seed=1)
    rows = []
    rng = np.random.default_rng(0)
    words = ["good", "bad", "movie", "film", "great", "boring", "the", "was", "loved", "it"]
    for i in range(24):
        prompt = "Human: " + " ".join(rng.choice(words, 4)) + " Assistant:"
        rows.append({"prompt": prompt, "chosen": " " + " ".join(rng.choice(words, 3)),
                     "rejected": " " + " ".join(rng.choice(words, 5))})
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    c = base_config()
    c.model.hf_path = str(tmp_path / "policy")
    c.model.ref_hf_path = str(tmp_path / "reference")
    # buckets: one batch shape, so one compile per step function
    c.data.update(source="generic", path=str(data), tokenizer=str(tok_dir), eval_split="",
                  eval_size=8, max_length=64, max_prompt_length=32, buckets="48")
    c.train.update(steps=3, batch_size=8, eval_every=3, eval_batch_size=8, checkpoint_every=0,
                   async_checkpointing=False)
    c.mesh.shape = {"data": 2, "fsdp": 2, "tensor": 2}
    return c, policy, reference, tmp_path


def test_policy_and_reference_from_different_hf_checkpoints(hf_setup):
    """The DPO eval step on a 2x2x2 mesh, with the policy and the reference loaded from their
    HF directories as the task loads them (``state.init_policy`` / ``init_reference``) and a
    batch of the task's eval stream: its sums are PyTorch's log-probs of the two models."""
    c, policy, reference, tmp_path = hf_setup
    rc = read_config(c)
    mesh = shard_lib.make_mesh(rc.mesh_shape)
    model = Model(rc.model)
    shardings = state_lib.param_shardings(model, mesh, rc.mesh_rules)
    params = state_lib.init_policy(model, shardings, rc.param_sources)
    ref_params = state_lib.init_reference(model, shardings, rc.param_sources, params)
    eval_stream = preference_data.preference_streams(rc, ("eval",), model_cfg=model.cfg, mesh=mesh)["eval"]
    batch = next(iter(eval_stream))
    eval_step = jax.jit(make_eval_step(model, losses_lib.loss_config_from(c.loss), rc.step),
                        static_argnums=3)
    sums = jax.device_get(eval_step(
        params, Frozen(reference=ref_params), *loop.device_batch(batch, mesh, rc.step.logprobs.scored_only)))
    weight = batch["pair_weight"]
    B = len(weight)
    pol = _torch_seq_logps(policy, batch["input_ids"], batch["loss_mask"])
    ref = _torch_seq_logps(reference, batch["input_ids"], batch["loss_mask"])
    beta = c.loss.beta
    want_chosen = np.sum(weight * beta * (pol[:B] - ref[:B]))
    want_logps = np.sum(weight * pol[B:])
    assert float(sums["rewards/chosen"][0]) == pytest.approx(want_chosen, rel=1e-4, abs=1e-5)
    assert float(sums["logps/rejected"][0]) == pytest.approx(want_logps, rel=1e-5)
    assert float(sums["loss"][1]) == np.sum(weight)
    # The two checkpoints differ, so DPO does not start at ln 2.
    assert abs(float(sums["loss"][0]) / float(sums["loss"][1]) - np.log(2)) > 1e-4


def test_trained_policy_exports_to_transformers(hf_setup):
    from dpo_jax.export import export_run

    c, _, _, tmp_path = hf_setup
    workdir = tmp_path / "run"
    summary = runs.run(c, workdir)
    assert summary["finished"] and summary["final_eval"]
    out = export_run(str(workdir), str(tmp_path / "exported"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.array([[5, 17, 42, 7, 99, 3]], np.int32)
    pos = np.arange(6, dtype=np.int32)[None]
    seg = np.ones_like(ids)
    model = Model(read_config(c).model)
    ours = np.asarray(model.logits(runs.final_params(c, workdir), ids, pos, seg))
    with torch.no_grad():
        theirs = reloaded(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    assert transformers.AutoTokenizer.from_pretrained(out)("Human: good").input_ids


def test_tokenizer_defaults_to_the_model_directory(hf_setup):
    c, _, _, tmp_path = hf_setup
    gpt2_style_tokenizer().save_pretrained(c.model.hf_path)
    c.data.tokenizer = ""
    rc = read_config(c)
    assert rc.data.tokenizer == c.model.hf_path
    assert c.data.tokenizer == ""  # reading the config leaves the given one as it was
    mesh = shard_lib.make_mesh(rc.mesh_shape)
    train_stream = preference_data.preference_streams(rc, ("train",), model_cfg=rc.model,
                                              mesh=mesh)["train"]
    assert next(iter(train_stream))["input_ids"].shape[0] == 2 * c.train.batch_size
