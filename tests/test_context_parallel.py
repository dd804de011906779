"""Context parallelism (models/context_parallel.py, mesh axis `context`): the sequence split
over devices, attention by all-gathered keys / values and per-token mask metadata, the
log-prob head per shard with psum-ed sums. On the 8 fake CPU devices every number equals the
unsharded computation to float32 round-off: hidden states, per-sequence
log-probs (packed, LD-DPO, WPO, hidden sums) and a DPO train step (metrics, per-sequence
log-probs and the update, i.e. the gradients) with context 2, 4 and 8, alone and with data,
fsdp and tensor, on plain, packed, prefix-shared and preference-tree batches, a
sliding-window + soft-cap model; plus the mesh, shardings and config checks, the long-context
config's variants and (slow) its smoke run against context 1."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dpo_jax import config as config_lib
from dpo_jax import sharding
from dpo_jax import workdir
from dpo_jax.data import to_global
from dpo_jax.logprobs import LogprobConfig, max_scored_tokens, sequence_logps
from dpo_jax.models import Model, context_parallel
from dpo_jax.models.config import preset
from dpo_jax.step import make_train_step, sequence_stats
from tests import helpers

# ----------------------------------------------------------------------------- mesh, shardings


def test_four_axis_mesh_and_the_three_axis_form():
    """The mesh has the four axes in order; a mapping or a 3-entry sequence without context
    is the earlier mesh (context 1); bad shapes are explained."""
    mesh = sharding.make_mesh({"data": 2, "context": 4})
    assert mesh.axis_names == ("data", "fsdp", "context", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "context": 4, "tensor": 1}
    assert dict(sharding.make_mesh((2, 2, 2)).shape) == {"data": 2, "fsdp": 2, "context": 1,
                                                         "tensor": 2}
    assert dict(sharding.make_mesh((1, 2, -1, 1)).shape)["context"] == 4
    with pytest.raises(ValueError, match="must have 4 entries"):
        sharding.make_mesh((2, 4))
    with pytest.raises(ValueError, match="context=0"):
        sharding.make_mesh({"data": -1, "context": 0})
    with pytest.raises(ValueError, match="unknown"):
        sharding.make_mesh({"sequence": 8})


def test_rules_split_embed_over_fsdp_and_context():
    """`embed` -> (fsdp, context): both split it on a mesh with both, one of them where the
    other is 1 (so 3-axis meshes shard as before), the last dropped when the product does not
    divide the dimension; the state bytes follow."""
    m = lambda **s: sharding.make_mesh(s)  # noqa: E731
    spec = lambda shape, mesh: sharding.logical_to_spec(("vocab", "embed"), shape, mesh)  # noqa
    assert spec((64, 32), m(fsdp=2, context=2, tensor=2)) == P("tensor", ("fsdp", "context"))
    assert spec((64, 32), m(fsdp=8)) == P(None, "fsdp")
    assert spec((64, 32), m(context=8)) == P(None, "context")
    assert spec((64, 6), m(fsdp=2, context=4)) == P(None, "fsdp")  # 8 does not divide 6
    assert sharding.spec_devices(P("tensor", ("fsdp", "context")),
                                 {"fsdp": 2, "context": 4, "tensor": 2}) == 16
    cfg = preset("tiny-llama")
    from dpo_jax.distributed import state_bytes_per_device
    one = state_bytes_per_device(cfg, {"data": 8})["params"]
    fsdp8 = state_bytes_per_device(cfg, {"fsdp": 8})["params"]
    assert state_bytes_per_device(cfg, {"context": 8})["params"] == fsdp8 < one
    assert state_bytes_per_device(cfg, {"fsdp": 2, "context": 4})["params"] == fsdp8


def test_batch_shardings_split_token_arrays_along_the_sequence():
    """Token arrays [rows, length] over (data, fsdp) x context, per-example arrays by rows only;
    pad_for_context rounds the length up with unscored segment-0 columns; an undivided length
    is an error naming the array."""
    mesh = sharding.make_mesh({"data": 2, "context": 4})
    batch = {"input_ids": np.ones((4, 10), np.int32), "loss_mask": np.ones((4, 10), np.float32),
             "segment_ids": np.ones((4, 10), np.int32), "pair_weight": np.ones((2,), np.float32)}
    with pytest.raises(ValueError, match="'input_ids' has length 10.*4 devices"):
        sharding.batch_shardings(batch, mesh)
    padded = sharding.pad_for_context(batch, mesh)
    assert padded["input_ids"].shape == (4, 12) and padded["pair_weight"].shape == (2,)
    assert padded["loss_mask"][:, 10:].sum() == 0 and padded["segment_ids"][:, 10:].sum() == 0
    specs = {k: s.spec for k, s in sharding.batch_shardings(padded, mesh).items()}
    assert specs["input_ids"] == P(("data", "fsdp"), "context")
    assert specs["pair_weight"] == P(("data", "fsdp"))
    three = sharding.make_mesh({"data": 8})
    assert sharding.batch_shardings(batch, three)["input_ids"].spec == P(("data", "fsdp"), None)
    assert sharding.pad_for_context(batch, three)["input_ids"].shape == (4, 10)


def test_config_mesh_fields():
    """mesh.shape reads the 4 axes (a 3-axis block is context 1), errors name the field;
    rules accept a list of axes; an old run's [embed, fsdp] equals the new default on a
    mesh without context (no refused change on resume), but not on one with it."""
    c = config_lib.base_config()
    assert config_lib.read_config(c).mesh_shape == {"data": -1, "fsdp": 1, "context": 1,
                                                    "tensor": 1}
    assert sharding.read_mesh_shape({"data": 2, "fsdp": 1, "tensor": 4})["context"] == 1
    c.mesh.shape.context = 0
    with pytest.raises(ValueError, match=r"mesh.shape.context=0"):
        config_lib.read_config(c)
    c.mesh.shape.context = 2
    c.model.attention_impl = "cudnn"
    with pytest.raises(ValueError, match="mesh.shape.context=2.*attention_impl"):
        config_lib.read_config(c)
    with pytest.raises(ValueError, match=r"mesh.shape: unknown axes \['seq'\]"):
        sharding.read_mesh_shape({"seq": 2})
    rules = config_lib.read_config(config_lib.base_config()).mesh_rules
    assert dict(rules)["embed"] == ("fsdp", "context") and dict(rules)["vocab"] == "tensor"
    with pytest.raises(ValueError, match=r"mesh.rules\[0\].*'seq'"):
        sharding.read_mesh_rules([["embed", ["fsdp", "seq"]]])
    new = workdir.config_dict(config_lib.base_config())
    old = dict(new, mesh={"shape": {"data": -1, "fsdp": 1, "tensor": 1},
                          "rules": [[n, "fsdp" if n == "embed" else a]
                                    for n, a in new["mesh"]["rules"]]})
    assert workdir.config_changes(old, new) == {}
    cp = dict(new, mesh=dict(new["mesh"], shape=dict(new["mesh"]["shape"], context=2)))
    assert set(workdir.config_changes(old, cp)) == {"mesh.rules", "mesh.shape.context"}


# ----------------------------------------------------------------------------- forward and head


def _packed_inputs(B=4, T=30, vocab=128, seed=0):
    """Two packed segments per row (12 and 15 tokens, positions restarting) then 3 padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (B, T)).astype(np.int32)
    seg = np.ones((B, T), np.int32)
    seg[:, 12:], seg[:, 27:] = 2, 0
    pos = np.tile(np.concatenate([np.arange(12), np.arange(T - 12)]), (B, 1)).astype(np.int32)
    return ids, pos, seg


@pytest.mark.parametrize("preset_name,overrides,shape", [
    ("tiny-llama", {}, {"data": 4, "context": 2}),
    ("tiny-llama", {"attention_impl": "chunked", "attention_chunk": 2}, {"fsdp": 2, "context": 4}),
    ("tiny-gemma", {}, {"context": 8}),  # sliding + full layers, both soft-caps; 30 = 8 x 4 - 2
])
def test_hidden_states_equal_unsharded(preset_name, overrides, shape):
    """The decoder's hidden states with the sequence split (padding added inside when 8 does
    not divide 30) equal the unsharded forward."""
    model = Model(preset(preset_name, **overrides))
    params = helpers.init_params(model, 0)
    ids, pos, seg = _packed_inputs()
    want = jax.jit(model.hidden)(params, ids, pos, seg)
    with jax.set_mesh(sharding.make_mesh(shape)):
        lowered = jax.jit(model.hidden).lower(params, ids, pos, seg)
        assert "all-gather" in lowered.compile().as_text()
        got = lowered.compile()(params, ids, pos, seg)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(4, 1, 2, 1), (1, 1, 8, 1), (1, 2, 2, 2)])
def test_sequence_logps_equal_unsharded(shape):
    """The head per shard with psum-ed sums: packed sums and counts, LD-DPO weights (ranks
    across shards), WPO sums, hidden sums, soft-capped logits, scored-only compaction and
    chunks, equal the unsharded head; so do the gradients."""
    h, w, b, ids, mask = helpers.head_batch(rows=4, length=19, vocab=36)
    index = np.where(mask > 0, helpers.packed_seq_index(mask), -1)
    cfg = LogprobConfig(scored_only=True, seq_chunk=4, vocab_chunk=16)
    kw = dict(max_scored=max_scored_tokens(mask, minimum=1), seq_index_RL=index, num_seqs=8,
              ld_shared_S=jnp.asarray([3.0, 1.0, 2.0, 0.0, 4.0, 2.0, 1.0, 3.0]), ld_alpha=0.5,
              with_wpo=True, softcap=4.0, with_hidden=True)

    def f(h, w, b):
        out = sequence_logps(h, ids, mask, w, b, cfg, **kw)
        return jnp.sum(out.sums * jnp.arange(1.0, 9.0)), out

    want = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(h, w, b)
    mesh = sharding.make_mesh(shape)
    put = lambda x, *spec: jax.device_put(x, jax.sharding.NamedSharding(mesh, P(*spec)))  # noqa
    w, b = put(w, "tensor"), put(b, "tensor")  # vocab over tensor; 19 positions: padded
    with jax.set_mesh(mesh):
        lowered = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)).lower(h, w, b)
        assert "all-reduce" in lowered.compile().as_text()  # the psum of the sums
        got = lowered.compile()(h, w, b)
    jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, rtol=2e-5, atol=2e-5), got, want)
    assert float(jnp.sum(want[0][1].counts)) == mask[:, 1:].sum()


# ----------------------------------------------------------------------------- the DPO step


LONG = 4096  # tokens per row of the "long" layout


def _batch(layout: str):
    if layout == "long":  # 2 pairs of LONG-token rows (chosen rows first), each pair's rows
        rng = np.random.default_rng(0)  # sharing a prompt, 256 scored tokens per row
        ids = rng.integers(0, 128, (4, LONG), dtype=np.int32)
        ids[2:, :LONG - 256] = ids[:2, :LONG - 256]
        mask = np.zeros((4, LONG), np.float32)
        mask[:, LONG - 256:] = 1.0
        return {"input_ids": ids, "positions": np.tile(np.arange(LONG, dtype=np.int32), (4, 1)),
                "segment_ids": np.ones_like(ids), "loss_mask": mask,
                "pair_weight": np.ones((2,), np.float32)}
    if layout == "trees":  # preference trees (issue 31): packed conversations, DFS intervals
        from tests.test_trees import forest, tree_batch
        return tree_batch(forest(8, seed=4, branch_points=16), row_multiple=4, packing=True,
                          pack_length=64, buckets=[64])
    pairs = helpers.synthetic_pairs(8)
    if layout == "packed":
        return helpers.pair_batch(pairs, packing=True, pack_length=96, buckets="96")
    if layout == "prefix":
        return helpers.pair_batch(pairs, prefix_sharing=True, buckets="48,64")
    return helpers.pair_batch(pairs, buckets="48")


def _model(name: str) -> Model:
    if name == "llama-long":  # query blocks of 128 rows: 4 to 32 per device at LONG tokens
        return Model(preset("tiny-llama", attention_impl="chunked", attention_chunk=128,
                            max_len=LONG))
    if name == "gemma":  # a sliding window of 4 on every other layer, both soft-caps, chunked
        return Model(preset("tiny-gemma", attention_impl="chunked", attention_chunk=4))
    return Model(preset("tiny-llama"))


@functools.cache
def _dpo_step(model_name: str, layout: str, shape: tuple | None):
    """(metrics, per-sequence policy log-probs, update) of one DPO step (sigmoid, SGD lr 1: the
    update is minus the gradient) on one device (shape None) or on the mesh of ``shape``
    (data, fsdp, context, tensor), the state sharded by the default rules."""
    model = _model(model_name)
    params = helpers.init_params(model, 0)
    tx, schedule = helpers.optimizer()
    if shape is None:
        mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
    else:
        mesh = sharding.make_mesh(shape)
    state = helpers.train_state(model, params, tx, helpers.perturbed(params, 0.05), mesh)
    batch_np = sharding.pad_for_context(_batch(layout), mesh)
    max_scored = max_scored_tokens(batch_np["loss_mask"])
    batch = to_global(batch_np, sharding.batch_shardings(batch_np, mesh))
    step = make_train_step(model, helpers.loss_config(), tx, schedule, helpers.step_config())
    stats = lambda p, b: sequence_stats(model, p, b, helpers.step_config(), max_scored).logps  # noqa

    def both(state, batch):
        return step(state, batch, max_scored), stats(state.trainable, batch)

    with jax.set_mesh(mesh):
        (new_state, metrics), logps = jax.jit(both)(state, batch)
    update = jax.tree.map(lambda a, b: np.asarray(a, np.float64) - b,
                          jax.device_get(new_state.trainable), params)
    return jax.device_get(metrics), np.asarray(logps), update


# (model, batch layout, mesh (data, fsdp, context, tensor)). The fast suite: context 8, 4 and
# 2, each with another layout, the last with fsdp and tensor; the rest compile one step each
# (about 20 s on 2 cores) and run with --run-slow.
slow = pytest.mark.slow
CASES = [
    pytest.param("llama", "prefix", (1, 1, 8, 1), marks=slow),
    pytest.param("gemma", "trees", (2, 1, 4, 1), marks=slow),
    ("llama", "packed", (1, 2, 2, 2)),
    pytest.param("gemma", "plain", (2, 1, 4, 1), marks=slow),
    pytest.param("llama", "trees", (1, 2, 4, 1), marks=slow),
    pytest.param("llama", "plain", (4, 1, 2, 1), marks=slow),
    pytest.param("llama", "packed", (1, 2, 4, 1), marks=slow),
    pytest.param("llama", "plain", (1, 2, 2, 2), marks=slow),
    pytest.param("llama", "packed", (1, 1, 2, 4), marks=slow),
    pytest.param("gemma", "prefix", (1, 2, 2, 2), marks=slow),
    pytest.param("gemma", "packed", (1, 1, 8, 1), marks=slow),
    pytest.param("llama", "prefix", (2, 2, 2, 1), marks=slow),
]


@pytest.mark.parametrize("model_name,layout,shape", CASES)
def test_dpo_step_equals_unsharded(model_name, layout, shape):
    """One DPO train step with the sequence split equals the one-device step: every metric
    (loss, rewards, log-prob means), each sequence's summed log-prob and the update (the
    gradients), to float32 round-off."""
    _assert_step_equals_unsharded(model_name, layout, shape)


def _assert_step_equals_unsharded(model_name, layout, shape):
    m_ref, lp_ref, u_ref = _dpo_step(model_name, layout, None)
    m, lp, u = _dpo_step(model_name, layout, shape)
    assert set(m) == set(m_ref)
    for k in m_ref:
        np.testing.assert_allclose(m[k], m_ref[k], rtol=1e-5, atol=1e-5, err_msg=k)
    np.testing.assert_allclose(lp, lp_ref, rtol=1e-5, atol=1e-4)
    scale = helpers.global_norm(u_ref)
    assert scale > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * scale), u, u_ref)


@pytest.mark.slow  # two 4k-token steps and the one-device step: minutes on 2 loaded cores
@pytest.mark.parametrize("shape", [(1, 1, 8, 1), (1, 2, 4, 1)])
def test_long_context_step_equals_unsharded(shape):
    """A 4,096-token DPO step (tiny Llama, chunked attention) with context 8 and fsdp 2 x
    context 4 equals the one-device step, as the short cases above. Its size is the point:
    its devices compute long between collectives, so the layer loop's all-gathers and the
    log-prob halo's collective-permute block XLA:CPU pool threads at the same time, the
    pattern that deadlocked the 32k-token step with XLA's default pools (8 threads for 8 fake
    devices; tests/conftest.py sets PJRT_NPROC, dpo_jax.distributed.cpu_pool_threads). The
    hang depends on timing (with 8 threads this step once completed); the pool size itself is
    checked in test_main_flags.py."""
    _assert_step_equals_unsharded("llama-long", "long", shape)


# ----------------------------------------------------------------------------- configs, a run

long_context = helpers.load_module("configs/long_context.py", "configs_long_context")


@pytest.mark.parametrize("variant,devices,context", [("tpu_v5p_64", 32, 4), ("gpu_8x8", 64, 8)])
def test_long_context_pod_variants(variant, devices, context):
    """The pod variants fill their device counts, their pair batch divides data x fsdp, and
    the mesh fields read back; the base is prefix-shared chunked bfloat16 at 128k tokens."""
    c = long_context.get_config(variant)
    shape = sharding.read_mesh_shape(c.mesh.shape, c.model.attention_impl)
    assert int(np.prod(list(shape.values()))) == devices and shape["context"] == context
    assert c.train.batch_size % (shape["data"] * shape["fsdp"]) == 0
    assert c.data.max_length == long_context.MAX_LENGTH and c.data.prefix_sharing
    assert c.model.attention_impl == "chunked" and c.model.remat == "full"


def test_context_axis_must_stay_inside_a_host():
    """A run refuses a context axis whose devices sit in several processes (each process loads
    whole rows); one inside a process passes."""
    import types
    devices = np.array([types.SimpleNamespace(process_index=p) for p in (0, 0, 1, 1)])
    fake = lambda axes: types.SimpleNamespace(  # noqa: E731
        devices=devices.reshape(1, 1, 4, 1) if axes == "across" else devices.reshape(2, 1, 2, 1),
        axis_names=sharding.MESH_AXES, shape={"context": 4 if axes == "across" else 2},
        local_devices=devices[:2])
    with pytest.raises(ValueError, match="context=4 spans 2 processes.*2 devices of a host"):
        workdir.check_context_axis(fake("across"))
    workdir.check_context_axis(fake("inside"))


@pytest.mark.slow  # two whole runs: about 40 s of CPU
def test_long_context_smoke_run(tmp_path, monkeypatch):
    """configs/long_context.py:smoke, a whole DPO run (2 steps, an eval, a checkpoint) with
    the sequence split 4 ways under the run's mesh, logs the losses of the same run with
    context 1 (mesh data 8) to float32 round-off; the context-parallel attention is traced in
    the first run only."""
    traced = []
    attend = context_parallel.attention
    monkeypatch.setattr(context_parallel, "attention",
                        lambda *a, **kw: traced.append(1) or attend(*a, **kw))
    from tests import runs
    runs.run(long_context.get_config("smoke"), tmp_path / "cp")
    n = len(traced)
    assert n > 0
    c = long_context.get_config("smoke")
    c.mesh.shape.update({"data": 8, "context": 1})
    runs.run(c, tmp_path / "dp")
    assert len(traced) == n
    got, want = runs.records(tmp_path / "cp"), runs.records(tmp_path / "dp")
    train = [r for r in want if "loss" in r and "step" in r]
    assert len(train) >= 2
    for r, s in zip(got, want):
        assert set(r) == set(s)
        for k in ("loss", "grad_norm", "logps/chosen", "logps/rejected", "eval/loss"):
            if k in s:
                assert r[k] == pytest.approx(s[k], rel=1e-5, abs=1e-5), k
