"""LoRA policies over a frozen base (dpo_jax/lora.py): the adapted forward equals the merged
model, step 0 equals the base, the reference is the base with the adapters off (one copy in the
state), steps on every mesh, with gradient accumulation, every kind of loss and stored
reference log-probs, and clear errors."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import lora as lora_lib
from dpo_jax import reference
from dpo_jax import sharding as shard_lib
from dpo_jax import state as state_lib
from dpo_jax.config import read_config
from dpo_jax.data.pipeline import PreferencePipeline
from dpo_jax.models import Model
from dpo_jax.step import StepConfig, make_train_step, pair_terms, sequence_stats
from tests import helpers, runs

TOL = {"rtol": 2e-5, "atol": 2e-6}
MESHES = {"dp": {"data": 8, "fsdp": 1, "tensor": 1}, "fsdp": {"data": 1, "fsdp": 8, "tensor": 1},
          "mixed": {"data": 2, "fsdp": 2, "tensor": 2}}


def lora_model(preset="tiny-gpt2", **lora):
    cfg = helpers.tiny_model_config() if preset == "tiny-gpt2" else helpers.preset(preset)
    return lora_lib.LoraModel(cfg, lora_lib.LoraConfig(**{"rank": 4, **lora}))


def trained_adapters(model, seed=0, scale=0.05):
    """Adapters as after training: A from the init, B random (so the update is not zero)."""
    return helpers.perturbed(jax.jit(model.init_adapters)(jax.random.key(seed)), scale, seed + 1)


def lora_state(model, base, adapters, tx, mesh_):
    rules = shard_lib.DEFAULT_RULES
    shardings = shard_lib.tree_shardings(model.abstract_adapters(), model.adapter_axes(), mesh_,
                                         rules)
    base = jax.device_put(base, state_lib.param_shardings(model, mesh_, rules))
    return state_lib.create_state(jax.device_put(adapters, shardings), tx, mesh_, shardings,
                                  state_lib.Frozen(lora_base=base))


def batch(num_pairs=8, **fields):
    return helpers.pair_batch(helpers.synthetic_pairs(num_pairs), **fields)


def ids(batch_):
    return batch_["input_ids"], batch_["positions"], batch_["segment_ids"]


# ----------------------------------------------------------------------------- the forward
@pytest.mark.parametrize("preset,targets", [("tiny-gpt2", ("all", "lm_head")),
                                            ("tiny-llama", ("q", "v", "gate", "lm_head"))])
def test_adapted_forward_equals_the_merged_model_and_starts_at_the_base(preset, targets):
    model = lora_model(preset, targets=targets)
    base = helpers.init_params(model)
    b = batch()
    plain = Model(model.cfg)
    want_base = plain.logits(base, *ids(b))
    start = jax.jit(model.init_adapters)(jax.random.key(0))
    np.testing.assert_array_equal(model.logits(lora_lib.join(base, start), *ids(b)), want_base)
    adapters = trained_adapters(model)
    got = model.logits(lora_lib.join(base, adapters), *ids(b))
    # a tied head's adapter leaves the input embedding: the merged model has its own head
    merged = Model(lora_lib.merged_config(model))
    assert not merged.cfg.tie_embeddings
    want = merged.logits(lora_lib.merge(model, base, adapters), *ids(b))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(got) - np.asarray(want_base)).max() > 1e-3  # the adapters act


def test_adapter_tree_shapes_axes_and_init():
    model = lora_model("tiny-llama", targets=("all", "lm_head"), rank=8, init="gaussian")
    cfg = model.cfg
    adapters = model.abstract_adapters()["lora"]
    assert set(adapters) == {"q", "k", "v", "o", "up", "gate", "down", "lm_head"}
    L, D, N, K, H = cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim
    assert adapters["k"]["a"].shape == (L, D, 8) and adapters["k"]["b"].shape == (L, 8, K, H)
    assert adapters["o"]["a"].shape == (L, N, H, 8) and adapters["o"]["b"].shape == (L, 8, D)
    assert adapters["lm_head"]["a"].shape == (D, 8)
    assert adapters["lm_head"]["b"].shape == (8, cfg.vocab_size)
    axes = model.adapter_axes()["lora"]
    assert axes["q"]["a"] == ("layers", "embed", None)
    assert axes["q"]["b"] == ("layers", None, "heads", "head_dim")
    assert axes["down"]["a"] == ("layers", "mlp", None)
    init = jax.jit(model.init_adapters)(jax.random.key(0))["lora"]
    assert all(not np.any(np.asarray(t["b"])) for t in init.values())
    np.testing.assert_allclose(np.std(np.asarray(init["up"]["a"])), 1 / 8, rtol=0.1)
    kaiming = lora_model("tiny-llama", rank=8)
    a = np.asarray(jax.jit(kaiming.init_adapters)(jax.random.key(0))["lora"]["up"]["a"])
    assert 0.9 / np.sqrt(D) < np.abs(a).max() <= 1 / np.sqrt(D)


# ----------------------------------------------------------------------------- the state
def test_reference_is_the_separately_loaded_base_and_the_state_holds_it_once():
    config = runs.dpo_config()
    config.model.lora.rank = 4
    config.model.param_dtype = "bfloat16"
    rc = read_config(config)
    model = lora_lib.make_model(rc.model, rc.lora)
    setup = state_lib.setup(rc, model, reference=True)
    state = setup.initial_state()
    # the trained tree is the adapters (float32), the base is frozen in bfloat16
    assert set(state.trainable) == {"lora"}
    assert {x.dtype for x in jax.tree.leaves(state.trainable)} == {jnp.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(state.frozen.lora_base)} == {jnp.dtype("bfloat16")}
    # one copy of the base: every other array of the state is adapter-sized or a scalar
    base_bytes = sum(x.nbytes for x in jax.tree.leaves(state.frozen.lora_base))
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(state.trainable))
    total = sum(x.nbytes for x in jax.tree.leaves(state))
    assert total - base_bytes <= 3 * adapter_bytes + 64  # adapters + AdamW's two moments
    # the reference log-probs are a separately loaded base model's
    separate = state_lib.init_policy(
        Model(rc.model), state_lib.param_shardings(model, setup.mesh, rc.mesh_rules),
        rc.param_sources)
    b = batch()
    step_cfg = StepConfig()
    want = sequence_stats(Model(rc.model), separate, b, step_cfg, None)
    loss_cfg = helpers.loss_config(beta=0.5)
    adapters = trained_adapters(model)
    policy, out = pair_terms(model, loss_cfg, adapters, state.frozen.lora_base, b, step_cfg, None)
    pi = np.concatenate([policy.chosen_logps, policy.rejected_logps])
    rewards = np.concatenate([out.chosen_rewards, out.rejected_rewards])
    np.testing.assert_allclose(pi - rewards / 0.5, want.logps, rtol=1e-5, atol=1e-4)
    assert np.abs(pi - np.asarray(want.logps)).max() > 1e-3  # the policy is not the reference


# ----------------------------------------------------------------------------- the step
def _one_step(model, base, adapters, b, loss_cfg, mesh_, grad_accum=1):
    tx, schedule = helpers.optimizer()
    state = lora_state(model, base, adapters, tx, mesh_)
    step = jax.jit(make_train_step(model, loss_cfg, tx, schedule, StepConfig(grad_accum=grad_accum)),
                   static_argnums=2)
    new, metrics = step(state, b, None)
    np.testing.assert_array_equal(jax.tree.leaves(jax.device_get(new.frozen.lora_base))[0],
                                  jax.tree.leaves(jax.device_get(base))[0])
    update = jax.tree.map(lambda x, y: np.asarray(x) - np.asarray(y),
                          jax.device_get(new.trainable), jax.device_get(adapters))
    return update, jax.device_get(metrics), new


def _assert_same(a, b):
    for k in ("loss", "rewards/margins", "logps/chosen", "logps/rejected", "grad_norm"):
        np.testing.assert_allclose(b[1][k], a[1][k], err_msg=k, **TOL)
    for x, y in zip(jax.tree.leaves(a[0]), jax.tree.leaves(b[0]), strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)
    assert helpers.global_norm(a[0]) > 0


@pytest.fixture(scope="module")
def dp_step():
    model = lora_model()
    base, adapters = helpers.init_params(model), trained_adapters(model)
    b = batch()
    return model, base, adapters, b, _one_step(model, base, adapters, b,
                                               helpers.loss_config(beta=0.5),
                                               helpers.mesh(MESHES["dp"]))


@pytest.mark.parametrize("mesh_name", [pytest.param("fsdp", marks=pytest.mark.slow), "mixed"])
def test_lora_step_on_every_mesh_shards_the_frozen_base(dp_step, mesh_name):
    model, base, adapters, b, want = dp_step
    got = _one_step(model, base, adapters, b, helpers.loss_config(beta=0.5),
                    helpers.mesh(MESHES[mesh_name]))
    _assert_same(want, got)
    embed = got[2].frozen.lora_base["embed"].sharding.spec
    assert "fsdp" in jax.tree.leaves(tuple(embed))  # FSDP shards the frozen base too


@pytest.mark.parametrize("loss", ["sigmoid"] + [pytest.param(x, marks=pytest.mark.slow)
                                            for x in ("ipo", "simpo")])
def test_gradient_accumulation_equals_the_big_batch(loss):
    model = lora_model()
    base, adapters, b = helpers.init_params(model), trained_adapters(model), batch()
    loss_cfg = helpers.loss_config(loss, beta=0.5)
    one, two = (_one_step(model, base, adapters, b, loss_cfg, helpers.mesh(), n) for n in (1, 2))
    _assert_same(one, two)


def test_stored_reference_logps_are_the_base_forward(dp_step):
    model, base, adapters, _, _ = dp_step
    pairs = helpers.synthetic_pairs(8)
    stored = reference.compute_pair_logps(model, base, {"train": pairs}, helpers.data_config(),
                                          StepConfig(), helpers.mesh(), global_batch_size=8)
    pipe = PreferencePipeline(pairs, helpers.data_config(), train=False, global_batch_size=8,
                              reference=stored["train"])
    b = next(iter(pipe))
    loss_cfg = helpers.loss_config(beta=0.5)
    online = _one_step(model, base, adapters, {k: v for k, v in b.items()
                                               if not k.startswith("ref_")}, loss_cfg,
                       helpers.mesh())
    _assert_same(online, _one_step(model, base, adapters, b, loss_cfg, helpers.mesh()))


def test_dropout_masks_follow_the_step():
    model = lora_model(dropout=0.5)
    base, adapters, b = helpers.init_params(model), trained_adapters(model), batch()

    def logits(step):
        key = lora_lib.step_key(model, jnp.asarray(step))
        return np.asarray(model.logits(lora_lib.join(base, adapters), *ids(b), dropout_rng=key))

    np.testing.assert_array_equal(logits(3), logits(3))
    assert np.abs(logits(3) - logits(4)).max() > 1e-4
    no_dropout = np.asarray(model.logits(lora_lib.join(base, adapters), *ids(b)))
    plain = lora_model()
    np.testing.assert_array_equal(
        no_dropout, np.asarray(plain.logits(lora_lib.join(base, adapters), *ids(b))))


# ----------------------------------------------------------------------------- errors
def test_unknown_target_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown target 'qkv'.*q, k, v, o, up, down"):
        lora_model(targets=("qkv",))
    with pytest.raises(ValueError, match="'gate'.*not gated"):
        lora_model(targets=("gate",))


def test_rank_larger_than_a_target():
    cfg = helpers.tiny_model_config()
    with pytest.raises(ValueError, match=f"rank=64 is larger than target 'q'.*<= {cfg.d_model}"):
        lora_model(rank=64, targets=("q",))


def test_mixture_of_experts_mlp_is_not_a_target():
    if "n_experts" not in {f.name for f in dataclasses.fields(helpers.tiny_model_config())}:
        pytest.skip("no mixture-of-experts models in this tree")
    try:
        cfg = helpers.preset("tiny-llama", n_experts=4, n_experts_per_tok=2)
    except (TypeError, ValueError) as e:
        pytest.skip(f"mixture-of-experts preset unavailable: {e}")
    with pytest.raises(ValueError, match="'up'.*mixture of experts"):
        lora_lib.LoraModel(cfg, lora_lib.LoraConfig(rank=4, targets=("q", "up")))
    assert "up" not in {t.name for t in lora_lib.LoraModel(
        cfg, lora_lib.LoraConfig(rank=4)).targets}


@pytest.mark.parametrize("field,value,match", [
    ("init.reference", "some/run", "init.reference='some/run'.*ambiguous"),
    ("model.ref_hf_path", "some/hf", "model.ref_hf_path='some/hf'.*ambiguous"),
    ("model.ref_param_dtype", "bfloat16", "ref_param_dtype"),
    ("train.ref_sync_every", 2, "TR-DPO"),
])
def test_lora_refuses_a_second_reference(field, value, match):
    config = runs.dpo_config()
    config.model.lora.rank = 4
    config.update_from_flattened_dict({field: value})
    rc = read_config(config)
    with pytest.raises(ValueError, match=match):
        state_lib.setup(rc, lora_lib.make_model(rc.model, rc.lora), reference=True)


def test_a_task_without_adapters_refuses_lora():
    config = runs.reward_config()
    config.model.lora.rank = 4
    rc = read_config(config)
    with pytest.raises(ValueError, match="does not train adapters"):
        state_lib.setup(rc, Model(rc.model))


@pytest.mark.parametrize("path,variant,rank,policy", [
    ("configs/lora_sft.py", "", 16, ""), ("configs/lora_dpo.py", "", 16, ""),
    ("configs/lora_dpo.py", "from_sft", 16, "runs/lora_sft"),
    ("configs/lora_dpo.py", "from_sft,full", 0, "runs/lora_sft")])
def test_lora_configs(path, variant, rank, policy):
    rc = read_config(helpers.load_module(path, "cfg").get_config(variant))
    assert rc.lora.rank == rank and rc.param_sources.policy == policy
    assert rc.task == ("sft" if "sft.py" in path else "dpo")

