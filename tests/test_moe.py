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
    "qwen3-moe": ("Qwen3MoeConfig", dict(num_experts=8, num_experts_per_tok=3,
                                         moe_intermediate_size=16, head_dim=8,
                                         norm_topk_prob=True, router_aux_loss_coef=0.25)),
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
                               cfg.n_experts_per_tok, cfg.moe_renormalize)[2]
             for x in router_logits]
    stacked = jax.tree.map(lambda *a: jax.numpy.stack(a), *stats)
    for m in (mask, np.ones_like(mask)):
        ref = load_balancing_loss_func(router_logits, cfg.n_experts, cfg.n_experts_per_tok,
                                       torch.tensor(m))
        assert float(moe.load_balancing_loss(stacked, m)) == pytest.approx(float(ref), rel=1e-5)


def test_router_coefficient_resolves_as_trl(models, tmp_path):
    """loss.router_aux_loss_coef None (the default) is the weight TRL 1.16 reads from the model
    config (`getattr(text_config, 'router_aux_loss_coef', 0.0)` of transformers' config object,
    so its class default when config.json has none); a number is used as given; a dense model
    reads 0 and refuses a positive weight; output_router_logits (any value) is accepted."""
    import dataclasses
    import json

    for name, (path, _, _, cfg, _) in models.items():
        theirs = transformers.AutoConfig.from_pretrained(path).router_aux_loss_coef
        assert cfg.router_aux_loss_coef == theirs, name
        assert moe.router_aux_coef(None, cfg) == theirs and moe.router_aux_coef(0.0, cfg) == 0
        assert moe.router_aux_coef(0.7, cfg) == 0.7
        with open(f"{path}/config.json") as f:
            c = json.load(f)
        del c["router_aux_loss_coef"]
        c["output_router_logits"] = True
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "config.json", "w") as f:
            json.dump(c, f)
        default = transformers.AutoConfig.from_pretrained(tmp_path / name).router_aux_loss_coef
        assert load_hf_config(str(tmp_path / name)) == dataclasses.replace(
            cfg, router_aux_loss_coef=default) and default == 0.001
    assert models["qwen3-moe"][3].router_aux_loss_coef == 0.25
    dense = preset("tiny-llama")
    assert moe.router_aux_coef(None, dense) == 0.0 == moe.router_aux_coef(0.0, dense)
    with pytest.raises(ValueError, match="no experts"):
        moe.router_aux_coef(0.1, dense)


def test_dpo_step_adds_the_router_loss(models):
    """loss.router_aux_loss_coef: the step's loss is the DPO loss plus coef * aux_loss, and
    aux_loss is transformers' aux_loss of the policy forward over the pair batch; the default
    (None) takes the model config's weight (0.5 here), 0 turns it off."""
    import dataclasses

    _, hf_model, _, cfg, params = models["mixtral"]
    model = Model(dataclasses.replace(cfg, router_aux_loss_coef=0.5))
    runs = {coef: helpers.one_device_dpo_step(
        model, params, helpers.loss_config(router_aux_loss_coef=coef)) for coef in (0.0, None)}
    metrics = {coef: run.metrics for coef, run in runs.items()}
    batch_np, batch = runs[None].batch_np, runs[None].batch
    assert "aux_loss" not in metrics[0.0]
    assert 0.0 < float(metrics[0.0]["routing/agreement"]) <= 1.0  # logged every step
    aux = float(metrics[None]["aux_loss"])
    want, _ = _hf_router(hf_model, batch_np["input_ids"],
                         (batch_np["segment_ids"] > 0).astype(np.int64))
    assert aux == pytest.approx(want, rel=1e-5)
    assert float(metrics[None]["loss"]) == pytest.approx(float(metrics[0.0]["loss"]) + 0.5 * aux,
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


def test_sft_and_reward_objectives_add_the_router_loss(models):
    """SFT (TRL 1.16's SFTTrainer: loss + coef * aux_loss) and the reward model (Bradley-Terry +
    coef * aux_loss, as the DPO step; TRL's RewardTrainer adds none): each objective's loss is
    its coef-0 loss plus coef times aux_loss, aux_loss the router loss of the same forward
    (`Model.hidden(router_aux=True)`), and the router loss trains the reward model's router
    (its zero head gives the Bradley-Terry term no gradient there)."""
    from dpo_jax import sft
    from dpo_jax.reward_model import RewardModel, reward_objective

    _, _, _, cfg, params = models["qwen3-moe"]
    model = Model(cfg)
    batch = {k: jax.numpy.asarray(v)
             for k, v in helpers.pair_batch(helpers.synthetic_pairs(4)).items()}
    want = float(model.hidden(params, batch["input_ids"], batch["positions"],
                              batch["segment_ids"], router_aux=True)[1])
    sft_obj = sft.sft_objective(model, "unlikelihood", 0.5, helpers.step_config().logprobs,
                                None, None, 0.3)
    loss, m = jax.jit(lambda p: sft_obj.loss(p, None, batch, None, sft_obj.totals(batch)))(params)
    assert float(m["aux_loss"]) == pytest.approx(want, rel=1e-5)
    assert float(loss) == pytest.approx(float(m["nll"] + 0.5 * m["ul"]) + 0.3 * want, rel=1e-5)
    reward = RewardModel(model)
    obj = reward_objective(reward, None, 0.3)
    (loss, m), grad = jax.jit(jax.value_and_grad(
        lambda p: obj.loss(p, None, batch, None, obj.totals(batch)), has_aux=True))(
        {"decoder": params, "value_head": reward.init_head()})
    assert float(m["aux_loss"]) == pytest.approx(want, rel=1e-5)
    assert float(loss) == pytest.approx(np.log(2) + 0.3 * want, rel=1e-5)  # zero head: ln 2
    assert float(np.abs(np.asarray(grad["decoder"]["layers"]["mlp"]["router"])).max()) > 0


def test_routing_agreement_counts_scored_tokens_with_the_same_expert_set():
    """moe.routing_agreement on hand-written expert ids: a token agrees when its sorted top-k
    set is equal (the order the router ranked them in does not matter: top_k_routing sorts);
    only masked tokens count."""
    logits = jax.numpy.array([[[3.0, 2.0, 0.0, 1.0], [0.0, 1.0, 2.0, 3.0]]])  # [B=1, T=2, E]
    swapped = jax.numpy.array([[[2.0, 3.0, 0.0, 1.0], [3.0, 1.0, 2.0, 0.0]]])
    ids = moe.top_k_routing(logits, 2, True)[2][2]
    ids_ref = moe.top_k_routing(swapped, 2, True)[2][2]
    np.testing.assert_array_equal(ids, [[[0, 1], [2, 3]]])
    np.testing.assert_array_equal(ids_ref, [[[0, 1], [0, 2]]])
    L2 = lambda a, b: jax.numpy.stack([a, b])  # two layers: the second identical
    agree, n = moe.routing_agreement(L2(ids, ids), L2(ids_ref, ids), np.array([[1.0, 1.0]]))
    np.testing.assert_array_equal(agree, [1.0, 2.0])
    assert float(n) == 2.0
    agree, n = moe.routing_agreement(L2(ids, ids), L2(ids_ref, ids), np.array([[0.0, 1.0]]))
    np.testing.assert_array_equal(agree, [0.0, 1.0])
    assert float(n) == 1.0


def test_routing_drift_in_the_train_and_eval_steps(models):
    """The step's routing/agreement: 1.0 exactly when the reference is the policy; with the
    reference's layer-1 router negated (its top-2 of 4 experts becomes the policy's bottom 2:
    disjoint on every token, layer 0 unchanged) the eval summary reads 1 for layer 0, 0 for
    layer 1, and the logged mean 0.5."""
    from dpo_jax.step import make_eval_step
    from dpo_jax.train_state import Frozen

    _, _, _, cfg, params = models["mixtral"]
    model = Model(cfg)
    batch_np = helpers.pair_batch(helpers.synthetic_pairs(4))
    batch = {k: jax.numpy.asarray(v) for k, v in batch_np.items()}
    ref = jax.tree.map(lambda x: x, params)
    ref["layers"]["mlp"]["router"] = params["layers"]["mlp"]["router"].at[1].multiply(-1.0)
    step = jax.jit(make_eval_step(model, helpers.loss_config(), helpers.step_config()),
                   static_argnums=3)
    for reference, want in ((params, [1.0, 1.0]), (ref, [1.0, 0.0])):
        m = jax.device_get(step(params, Frozen(reference=reference), batch, 64))
        got = [m[f"routing/agreement/layer_{i}"][0] / m[f"routing/agreement/layer_{i}"][1]
               for i in range(2)]
        assert got == want
        assert m["routing/agreement"][0] / m["routing/agreement"][1] == np.mean(want)
