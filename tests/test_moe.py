"""Mixture-of-experts (dpo_jax/models/moe.py) beyond the logits parity of test_hf_families.py:
the router's load-balancing loss against transformers (`load_balancing_loss_func` and the
models' own `aux_loss`), the loss term in a DPO step, sharded checkpoints read into an expert-
sharded mesh, the `expert` mesh rule and parameter counts."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func  # noqa: E402

from dpo_jax import sharding as shard_lib  # noqa: E402
from dpo_jax import state as state_lib  # noqa: E402
from dpo_jax.models import Model, moe  # noqa: E402
from dpo_jax.models.config import param_count, preset  # noqa: E402
from dpo_jax.models.hf import load_hf_params  # noqa: E402
from dpo_jax.models.hf_config import load_hf_config  # noqa: E402
from tests import helpers  # noqa: E402

torch.set_num_threads(2)

BASE = helpers.TINY_HF_FIELDS
CASES = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2-moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2,
                                         moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48)),
}


def _batch():
    return helpers.padded_ids([12, 7, 4], low=3)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (dir, hf model, its logits on _batch, our cfg, our params)."""
    out = {}
    for name, (path, hf_model, ref) in helpers.random_hf_models(
            tmp_path_factory, CASES, BASE, *_batch(), attn_implementation="eager").items():
        cfg = load_hf_config(path)
        out[name] = (path, hf_model, ref, cfg, load_hf_params(path, cfg))
    return out


def _hf_router(hf_model, ids, mask):
    """transformers' aux_loss and router logits (per layer [B*T, E]) on ids / mask."""
    with torch.no_grad():
        out = hf_model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                       output_router_logits=True)
    return float(out.aux_loss), out.router_logits


@pytest.mark.parametrize("name", list(CASES))
def test_router_aux_loss_matches_transformers(name, models):
    _, hf_model, _, cfg, params = models[name]
    ids, mask = _batch()
    want, router_logits = _hf_router(hf_model, ids, mask)
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    _, aux = Model(cfg).hidden(params, ids, pos, mask, router_aux=True)
    assert float(aux) == pytest.approx(want, rel=1e-5)
    # the reduction alone, on transformers' router logits, with and without a padding mask
    B, T = ids.shape
    stats = [moe.top_k_routing(jax.numpy.asarray(x.numpy()).reshape(B, T, -1),
                               cfg.n_experts_per_tok, cfg.moe_renormalize)[1]
             for x in router_logits]
    stacked = jax.tree.map(lambda *a: jax.numpy.stack(a), *stats)
    for m in (mask, np.ones_like(mask)):
        ref = load_balancing_loss_func(router_logits, cfg.n_experts, cfg.n_experts_per_tok,
                                       torch.tensor(m))
        assert float(moe.load_balancing_loss(stacked, m)) == pytest.approx(float(ref), rel=1e-5)


def test_dpo_step_adds_the_router_loss(models):
    """loss.router_aux_loss_coef: the step's loss is the DPO loss plus coef * aux_loss, and
    aux_loss is transformers' aux_loss of the policy forward over the pair batch."""
    _, hf_model, _, cfg, params = models["mixtral"]
    model = Model(cfg)
    runs = {coef: helpers.one_device_dpo_step(
        model, params, helpers.loss_config(router_aux_loss_coef=coef)) for coef in (0.0, 0.5)}
    metrics = {coef: run.metrics for coef, run in runs.items()}
    batch_np, batch = runs[0.5].batch_np, runs[0.5].batch
    assert "aux_loss" not in metrics[0.0]
    aux = float(metrics[0.5]["aux_loss"])
    want, _ = _hf_router(hf_model, batch_np["input_ids"],
                         (batch_np["segment_ids"] > 0).astype(np.int64))
    assert aux == pytest.approx(want, rel=1e-5)
    assert float(metrics[0.5]["loss"]) == pytest.approx(float(metrics[0.0]["loss"]) + 0.5 * aux,
                                                        rel=1e-5)
    # the router is what the term trains
    grad = jax.grad(lambda p: model.hidden(p, batch["input_ids"], batch["positions"],
                                           batch["segment_ids"], router_aux=True)[1])(params)
    assert float(np.abs(np.asarray(grad["layers"]["mlp"]["router"])).max()) > 0


def test_router_aux_refused_without_experts():
    cfg = preset("tiny-llama")
    model = Model(cfg)
    params = model.init(jax.random.key(0))
    ids, mask = _batch()
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        model.hidden(params, ids, np.broadcast_to(np.arange(ids.shape[1]), ids.shape), mask,
                     router_aux=True)


@pytest.mark.parametrize("name", list(CASES))
def test_sharded_checkpoint_into_expert_sharded_mesh(name, models, tmp_path):
    """Shards of model.safetensors.index.json, each expert read into its own device of a
    (fsdp 4, tensor 2) mesh: experts split over fsdp, their width over tensor."""
    _, hf_model, ref, cfg, _ = models[name]
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    mesh = shard_lib.make_mesh({"fsdp": 4, "tensor": 2})
    model = Model(cfg)
    shardings = state_lib.param_shardings(model, mesh, shard_lib.DEFAULT_RULES)
    assert shardings["layers"]["mlp"]["gate"].spec == P(None, "fsdp", None, "tensor")
    assert shardings["layers"]["mlp"]["down"].spec == P(None, "fsdp", "tensor", None)
    params = load_hf_params(str(tmp_path), cfg, shardings)
    assert params["layers"]["mlp"]["up"].sharding == shardings["layers"]["mlp"]["up"]
    ids, mask = _batch()
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    helpers.assert_logits_close(jax.jit(model.logits)(params, ids, pos, mask), ref, mask)


def test_switches_and_param_counts(models):
    mix, qwen = models["mixtral"][3], models["qwen2-moe"][3]
    assert (mix.family, mix.n_experts, mix.n_experts_per_tok, mix.moe_d_ff, mix.moe_renormalize,
            mix.shared_expert_d_ff) == ("mixtral", 4, 2, 64, True, 0)
    assert (qwen.family, qwen.n_experts, qwen.moe_d_ff, qwen.moe_renormalize,
            qwen.shared_expert_d_ff, qwen.qkv_bias) == ("qwen2_moe", 4, 32, False, 48, True)
    for _, _, _, cfg, params in models.values():
        assert param_count(cfg) == sum(x.size for x in jax.tree.leaves(params))
    # Mixtral-8x7B's published total
    assert param_count(preset("mixtral-8x7b")) == 46_702_792_704


@pytest.mark.parametrize("name", list(CASES))
def test_export_of_trained_weights_keeps_the_source_config(name, models, tmp_path):
    """dpo_jax.export.write_hf from an MoE source: config.json field by field as the source's,
    and transformers reloads the moved expert weights with our logits."""
    import json

    from dpo_jax.export import write_hf

    path, _, _, cfg, params = models[name]
    moved = jax.tree.map(lambda x: x + 0.01 * np.sign(np.asarray(x)), params)
    write_hf(str(tmp_path), cfg, moved, source=path)
    with open(f"{path}/config.json") as f, open(tmp_path / "config.json") as g:
        assert json.load(g) == json.load(f)
    back = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), attn_implementation="eager").eval()
    ids, mask = _batch()
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    helpers.assert_logits_close(Model(cfg).logits(moved, ids, pos, mask),
                                helpers.hf_logits(back, ids, mask), mask)


def test_gradients_on_an_expert_sharded_mesh(models):
    """Forward and backward through the experts and the router loss with the parameters on
    (fsdp 2, tensor 2), experts split over fsdp: the unsharded values and gradients."""
    _, _, _, cfg, params = models["qwen2-moe"]
    model = Model(cfg)
    ids, mask = _batch()
    pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)

    def objective(p):
        h, aux = model.hidden(p, ids, pos, mask, router_aux=True)
        return jax.numpy.mean(h.astype(jax.numpy.float32) ** 2) + aux

    mesh = shard_lib.make_mesh({"fsdp": 2, "tensor": 2}, devices=jax.devices()[:4])
    sharded = jax.device_put(params, state_lib.param_shardings(model, mesh,
                                                               shard_lib.DEFAULT_RULES))
    assert sharded["layers"]["mlp"]["down"].sharding.spec == P(None, "fsdp", "tensor", None)
    (v, g), (v_ref, g_ref) = (jax.jit(jax.value_and_grad(objective))(p)
                              for p in (sharded, params))
    assert float(v) == pytest.approx(float(v_ref), rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-4, atol=1e-6 * float(np.max(np.abs(b)) + 1)), g, g_ref)
