"""Reference log-probs as data (``dpo_jax.reference``): the numbers of the step's reference
forward, attached to shuffled batches by pair, cached by fingerprint; and, end to end, the same
training trajectory as the online reference."""

import glob
import os
import shutil

import jax
import numpy as np
import pytest

from dpo_jax import loop, reference
from dpo_jax.config import read_config
from dpo_jax.data import PreferencePipeline
from dpo_jax.logprobs import LogprobConfig
from dpo_jax.step import StepConfig, sequence_stats
from tests import helpers, runs

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def reference_model():
    """``(model, reference parameters, 16 synthetic pairs)``, shared by this file's tests."""
    model = helpers.tiny_model()
    return model, helpers.init_params(model, seed=1), helpers.synthetic_pairs(16)


def _mesh():
    return helpers.mesh({"data": 2, "fsdp": 2, "tensor": 2})


def _reference(model, params, pairs, tmp_path, step_cfg=None, **kw):
    return reference.reference_logps(
        model, params, pairs, data_cfg=helpers.data_config(buckets="32"),
        step_cfg=step_cfg or StepConfig(),
        mesh=_mesh(), batch_size=4,
        cache_dir=str(tmp_path / "cache"), **kw)


def test_shuffled_packed_batches_carry_the_numbers_of_the_steps_reference_forward(
        tmp_path, reference_model):
    """Computed in file order, unpacked, 4 pairs per forward, attached by pair index to a
    shuffled, packed train stream of 8 pairs per batch: equal to
    ``sequence_stats(forward_only=True)`` on that very batch, as the step computes the
    reference online."""
    model, ref_params, pairs = reference_model
    step_cfg = StepConfig(logprobs=LogprobConfig(scored_only=True))
    stored, _ = _reference(model, ref_params, {"train": pairs}, tmp_path, step_cfg)
    logps_N2, lengths_N2 = stored["train"]
    assert logps_N2.shape == lengths_N2.shape == (16, 2) and logps_N2.dtype == np.float32
    want_lengths = [[len(p["chosen"]), len(p["rejected"])] for p in pairs]
    np.testing.assert_array_equal(lengths_N2, want_lengths)  # every response token, EOS included
    assert (logps_N2 < 0).all()
    data_cfg = helpers.data_config(buckets="32", packing=True, pack_length=64, row_multiple=4)
    stream = PreferencePipeline(pairs, data_cfg, train=True, global_batch_size=8, seed=5,
                                reference=stored["train"])
    forward = jax.jit(lambda p, b, n: sequence_stats(model, p, b, step_cfg, n,
                                                     forward_only=True), static_argnums=2)
    for _ in range(3):  # two batches an epoch: crosses into a reshuffled epoch
        batch_np = next(stream)
        assert "seq_index" in batch_np
        batch, max_scored = helpers.device_batch(
            {k: v for k, v in batch_np.items() if not k.startswith("ref_")}, _mesh())
        s = jax.device_get(forward(ref_params, batch, max_scored))
        logps_S, lengths_S = s.logps, s.lengths
        np.testing.assert_allclose(batch_np["ref_logps"], logps_S, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(batch_np["ref_lengths"], lengths_S)


def test_stored_by_fingerprint_reused_and_recomputed_when_the_parameters_change(
        tmp_path, monkeypatch, reference_model):
    """(Every other input of the fingerprint: test_fingerprint_covers_data_params_and_settings.)"""
    model, ref_params, pairs = reference_model
    splits = {"train": pairs[:8], "eval": pairs[8:11]}  # eval: a padded last batch
    first, info = _reference(model, ref_params, splits, tmp_path)
    assert info["reused"] is False and os.path.exists(info["path"])
    assert first["train"][0].shape == (8, 2) and first["eval"][0].shape == (3, 2)

    calls = []
    original = reference.compute_pair_logps
    monkeypatch.setattr(reference, "compute_pair_logps",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    again, again_info = _reference(model, ref_params, splits, tmp_path)
    assert again_info == dict(info, reused=True) and not calls
    for split in splits:
        for got, want in zip(again[split], first[split]):
            np.testing.assert_array_equal(got, want)

    scaled = jax.tree.map(lambda x: x * 1.01, ref_params)
    other, other_info = _reference(model, scaled, splits, tmp_path)
    assert other_info["reused"] is False and len(calls) == 1
    assert other_info["fingerprint"] != info["fingerprint"]
    assert not np.allclose(other["train"][0], first["train"][0])
    np.testing.assert_array_equal(other["train"][1], first["train"][1])
    assert sorted(os.listdir(tmp_path / "cache")) == sorted(
        os.path.basename(i["path"]) for i in (info, other_info))


def test_each_host_gets_its_block_of_the_global_layout():
    pairs = helpers.synthetic_pairs(12)
    values = np.arange(12, dtype=np.float32) * 10
    reference_N2 = (np.stack([values, -values], 1), np.ones((12, 2), np.float32))
    hosts = [PreferencePipeline(pairs, helpers.data_config(), train=True, global_batch_size=4,
                                process_index=p, process_count=2, seed=3, reference=reference_N2)
             for p in range(2)]
    idx = hosts[0].epoch_batches(0)[0]
    want = np.concatenate([values[idx], -values[idx]])  # [2B]: chosen then rejected
    got = [h.batch_at(0, 0) for h in hosts]
    np.testing.assert_array_equal(np.concatenate([g["ref_logps"] for g in got]), want)
    for g in got:
        assert g["ref_logps"].shape == (4,) and g["pair_weight"].shape == (2,)
    with pytest.raises(ValueError, match=r"want \(12, 2\)"):
        PreferencePipeline(pairs, helpers.data_config(), train=True, global_batch_size=4,
                           reference=(values[:, None], reference_N2[1]))


def test_fingerprint_covers_data_params_and_settings():
    from dpo_jax.models import preset

    pairs = helpers.synthetic_pairs(4)
    kw = dict(tokenizer_name="", pad_id=0, ref_source={"reference": ""}, ref_checksum=[[1.0]],
              model_config=preset("tiny-gpt2"), logprob_config=LogprobConfig())
    base = reference.fingerprint({"train": pairs}, **kw)
    assert reference.fingerprint({"train": pairs}, **kw) == base
    edited = [dict(p) for p in pairs]
    edited[2] = dict(edited[2], chosen=edited[2]["chosen"][:-1])
    changes = [({"train": edited}, {}), ({"eval": pairs}, {}), ({"train": pairs}, dict(pad_id=1)),
               ({"train": pairs}, dict(ref_checksum=[[1.5]])),
               ({"train": pairs}, dict(model_config=preset("tiny-gpt2", n_layer=3))),
               ({"train": pairs}, dict(logprob_config=LogprobConfig(vocab_chunk=16))),
               ({"train": pairs}, dict(ref_source={"reference": "/other"}))]
    for splits, change in changes:
        assert reference.fingerprint(splits, **{**kw, **change}) != base, change
    params = {"a": np.arange(6, dtype=np.float32), "b": np.ones((2, 2), np.float32)}
    swapped = {"a": params["a"][::-1].copy(), "b": params["b"]}
    as_bf16 = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), params)
    assert reference.param_checksum(params) != reference.param_checksum(swapped)
    assert reference.param_checksum(params) != reference.param_checksum(as_bf16)


def test_forward_logprobs_must_score_the_same_positions():
    with pytest.raises(ValueError, match="scored_only"):
        StepConfig(logprobs=LogprobConfig(scored_only=True),
                   forward_logprobs=LogprobConfig(scored_only=False))


# --------------------------------------------------------------------------- end to end
# Whole DPO runs through ``dpo_jax.train.train_and_evaluate`` (tests/runs.py's tiny config).


def _config(precompute: bool, **train_overrides):
    c = runs.dpo_config(**{"steps": 3, "eval_every": 3, "batch_size": 8, "eval_batch_size": 16,
                           **train_overrides})
    c.data.synthetic.num_train = 32
    c.data.synthetic.num_eval = 32
    c.logprobs.precompute_reference = precompute
    # SGD at the full rate from step 1, so the rewards move; its update is proportional to the
    # gradient (Adam's would turn the rounding noise of a near-zero gradient into a full step).
    c.optim.name = "sgd"
    c.optim.lr = 1.0
    c.optim.warmup_steps = 0
    return c


def _stored(workdir) -> list[str]:
    """The stored reference files of a run (``reference.SUBDIR`` in its workdir)."""
    return sorted(glob.glob(os.path.join(workdir, reference.SUBDIR, "*.npz")))


def _assert_same_trajectory(want, got, keys):
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for k in keys:  # every key is logged somewhere, at the same steps in both runs
        assert any(k in r for r in want), k
        assert [k in r for r in got] == [k in r for r in want], k
    for w, g in zip(want, got):
        for k in keys:
            if k in w:
                assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-5), (w["step"], k)


def test_precomputed_reference_gives_the_online_trajectory(tmp_path):
    online, pre = _config(False), _config(True)
    runs.run(online, tmp_path / "online")
    assert _stored(tmp_path / "online") == []
    runs.run(pre, tmp_path / "pre")
    assert len(_stored(tmp_path / "pre")) == 1
    want, got = runs.records(tmp_path / "online"), runs.records(tmp_path / "pre")
    _assert_same_trajectory(want, got, ("loss", "rewards/margins", "rewards/chosen", "eval/loss",
                                        "eval/rewards/margins"))
    # The rewards are non-zero after the first update, so the reference really enters them.
    margins = [r["rewards/margins"] for r in want if "rewards/margins" in r]
    evals = [r["eval/loss"] for r in want if "eval/loss" in r]
    assert len(margins) == 3 and len(evals) == 1 and abs(margins[-1]) > 1e-2
    for g, w in zip(helpers.leaves(runs.final_params(pre, tmp_path / "pre")),
                    helpers.leaves(runs.final_params(online, tmp_path / "online")), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_forward_only_tiling_gives_the_same_trajectory(tmp_path):
    """logprobs.forward_{seq,vocab}_chunk tile the precomputed reference pass and the eval
    forward differently from the policy's training head: same numbers. (The online reference
    forward: test_step.py.)"""

    def config(tiled):
        c = _config(True)
        c.logprobs.seq_chunk, c.logprobs.vocab_chunk = 0, 0  # training head: one block
        if tiled:
            c.logprobs.forward_seq_chunk, c.logprobs.forward_vocab_chunk = 2, 48
        return c

    tiled, plain = read_config(config(True)).step, read_config(config(False)).step
    assert (tiled.logprobs.seq_chunk, tiled.logprobs.vocab_chunk) == (None, None)
    assert (tiled.forward_logprobs.seq_chunk, tiled.forward_logprobs.vocab_chunk) == (2, 48)
    assert plain.forward_logprobs == plain.logprobs
    for t in (False, True):
        runs.run(config(t), tmp_path / str(t))
    want, got = runs.records(tmp_path / "False"), runs.records(tmp_path / "True")
    _assert_same_trajectory(want, got, ("loss", "rewards/margins", "eval/loss",
                                        "eval/rewards/margins"))
    assert abs([r["rewards/margins"] for r in want if "rewards/margins" in r][-1]) > 1e-2
    # the stored file is keyed by the tiling that produced it
    [untiled_file], [tiled_file] = _stored(tmp_path / "False"), _stored(tmp_path / "True")
    assert os.path.basename(untiled_file) != os.path.basename(tiled_file)


def test_stored_reference_is_reused_on_resume_and_recomputed_when_the_fingerprint_changes(
        tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    runs.run(_config(True, steps=2, checkpoint_every=2), workdir)
    [path] = _stored(workdir)
    stored = dict(np.load(path))
    assert stored["train_logps"].shape == (32, 2) and stored["eval_logps"].shape == (32, 2)
    # Every scored response token counted; log-probs of a random model over vocab 128 are < 0.
    assert np.all(stored["train_lengths"] > 0) and np.all(stored["train_logps"] < 0)

    calls = {"n": 0}
    original = reference.compute_pair_logps

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(reference, "compute_pair_logps", counting)
    longer = _config(True, checkpoint_every=2)
    longer.allow_resume_changes = "train.steps"
    summary = runs.run(longer, workdir)
    assert summary["resumed_from"] == 2 and summary["finished"]
    assert calls["n"] == 0 and _stored(workdir) == [path]

    # The same store under a config whose reference numbers differ: a new fingerprint, hence
    # a new file (a workdir refuses such a change, so the store is copied into a fresh one).
    other = _config(True)
    other.model.ref_param_dtype = "bfloat16"
    fresh = tmp_path / "bf16"
    shutil.copytree(workdir / reference.SUBDIR, fresh / reference.SUBDIR)
    with pytest.raises(loop.Interrupted):  # the reference is computed before the first step
        runs.run(other, fresh, interrupt_after=1)
    assert calls["n"] == 1  # train and eval splits recomputed in one call
    files = _stored(fresh)
    assert len(files) == 2 and os.path.basename(path) in map(os.path.basename, files)
    [new] = [f for f in files if os.path.basename(f) != os.path.basename(path)]
    bf16 = dict(np.load(new))
    assert not np.array_equal(bf16["train_logps"], stored["train_logps"])
    np.testing.assert_allclose(bf16["train_logps"], stored["train_logps"], rtol=0.05)
