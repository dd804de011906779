"""Precomputed reference log-probs: same trajectory as the online reference, stored and reused."""

import json
import os

import jax
import numpy as np
import pytest

from dpo_jax import reference, train
from dpo_jax.data import PreferencePipeline
from dpo_jax.data.synthetic import SyntheticTask, make_pairs

from tests.test_train import _leaves, small_config

jax.config.update("jax_default_matmul_precision", "highest")


def _config(precompute: bool, **train_overrides):
    c = small_config(**{"steps": 3, "eval_every": 3, "batch_size": 8, "eval_batch_size": 16,
                        **train_overrides})
    c.data.synthetic.num_train = 32
    c.data.eval_size = 32
    c.logprobs.precompute_reference = precompute
    c.optim.warmup_steps = 0  # full learning rate from step 1, so the rewards move
    return c


def _log(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_precomputed_reference_gives_the_online_trajectory(tmp_path):
    online = train.Run(_config(False), str(tmp_path / "online"))
    assert online.state.ref_params is not None
    online.train()
    pre = train.Run(_config(True), str(tmp_path / "pre"))
    assert pre.state.ref_params is None  # no second copy of the model on the devices
    assert pre.reference_info["reused"] is False
    pre.train()
    want, got = _log(tmp_path / "online"), _log(tmp_path / "pre")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for w, g in zip(want, got):
        for k in ("loss", "rewards/margins", "rewards/chosen", "eval/loss", "eval/rewards/margins"):
            if k in w:
                assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-5), (w["step"], k)
    # The rewards are non-zero after the first update, so the reference really enters them.
    margins = [r["rewards/margins"] for r in want if "rewards/margins" in r]
    evals = [r["eval/loss"] for r in want if "eval/loss" in r]
    assert len(margins) == 3 and len(evals) == 1 and abs(margins[-1]) > 1e-2
    for g, w in zip(_leaves(pre.state.params), _leaves(online.state.params)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def test_forward_only_tiling_gives_the_same_trajectory(tmp_path):
    """logprobs.forward_{seq,vocab}_chunk tile the precomputed reference pass and the eval
    forward differently from the policy's training head: same numbers. (The online reference
    forward: test_train.py's sharded-mesh test.)"""
    precompute = True

    def config(tiled):
        c = _config(precompute)
        c.logprobs.seq_chunk, c.logprobs.vocab_chunk = 0, 0  # training head: one block
        if tiled:
            c.logprobs.forward_seq_chunk, c.logprobs.forward_vocab_chunk = 2, 48
        return c

    runs = {}
    for tiled in (False, True):
        run = train.Run(config(tiled), str(tmp_path / str(tiled)))
        runs[tiled] = run
        run.train()
    lp = runs[True].step_cfg
    assert (lp.logprobs.seq_chunk, lp.logprobs.vocab_chunk) == (None, None)
    assert (lp.no_grad_logprobs.seq_chunk, lp.no_grad_logprobs.vocab_chunk) == (2, 48)
    assert runs[False].step_cfg.forward_logprobs is None
    want, got = _log(tmp_path / "False"), _log(tmp_path / "True")
    for w, g in zip(want, got):
        for k in ("loss", "rewards/margins", "eval/loss", "eval/rewards/margins"):
            if k in w:
                assert g[k] == pytest.approx(w[k], rel=1e-4, abs=1e-5), (w["step"], k)
    assert abs([r["rewards/margins"] for r in want if "rewards/margins" in r][-1]) > 1e-2
    # the stored file is keyed by the tiling that produced it
    assert runs[True].reference_info["path"] != runs[False].reference_info["path"]


def test_forward_logprobs_must_score_the_same_positions():
    from dpo_jax.logprobs import LogprobConfig
    from dpo_jax.step import StepConfig

    with pytest.raises(ValueError, match="scored_only"):
        StepConfig(logprobs=LogprobConfig(scored_only=True),
                   forward_logprobs=LogprobConfig(scored_only=False))


def test_stored_reference_is_reused_on_resume_and_recomputed_when_the_fingerprint_changes(
        tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    first = train.Run(_config(True, steps=2, checkpoint_every=2), workdir)
    first.train()
    path = first.reference_info["path"]
    assert os.path.exists(path)
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
    resumed = train.Run(_config(True, checkpoint_every=2), workdir)
    assert resumed.start_step == 2
    assert resumed.reference_info == dict(first.reference_info, reused=True)
    assert calls["n"] == 0
    resumed.train()

    other = _config(True)
    other.model.ref_param_dtype = "bfloat16"  # different reference numbers -> new fingerprint
    changed = train.Run(other, str(tmp_path / "run"))
    assert changed.reference_info["fingerprint"] != first.reference_info["fingerprint"]
    assert changed.reference_info["reused"] is False
    assert calls["n"] == 2  # train and eval splits recomputed
    bf16 = dict(np.load(changed.reference_info["path"]))
    assert not np.array_equal(bf16["train_logps"], stored["train_logps"])
    np.testing.assert_allclose(bf16["train_logps"], stored["train_logps"], rtol=0.05)


def test_per_pair_hook_gives_each_host_its_block_of_the_global_layout():
    c = small_config()
    task = SyntheticTask(vocab_size=64, num_topics=4, prompt_len=(2, 4), response_len=(2, 5),
                         min_gap=1)
    pairs = make_pairs(task, 12, 0)
    values = np.arange(12, dtype=np.float32) * 10
    hosts = []
    for p in range(2):
        pipe = PreferencePipeline(pairs, c.data, train=True, global_batch_size=4,
                                  process_index=p, process_count=2, seed=3)
        reference.attach(pipe, np.stack([values, -values], 1), np.ones((12, 2), np.float32))
        hosts.append(pipe)
    idx = hosts[0]._batches(0)[0]
    want = np.concatenate([values[idx], -values[idx]])  # [2B]: chosen then rejected
    got = [h.batch_at(0, 0) for h in hosts]
    np.testing.assert_array_equal(np.concatenate([g["ref_logps"] for g in got]), want)
    for g in got:
        assert g["ref_logps"].shape == (4,) and g["pair_weight"].shape == (2,)


def test_fingerprint_covers_data_params_and_settings():
    from dpo_jax.logprobs import LogprobConfig
    from dpo_jax.models import preset

    task = SyntheticTask(vocab_size=64, num_topics=4, prompt_len=(2, 4), response_len=(2, 5),
                         min_gap=1)
    pairs = make_pairs(task, 4, 0)
    kw = dict(tokenizer="", pad_id=0, ref_source={"reference": ""}, ref_checksum=[[1.0]],
              model_config=preset("tiny-gpt2"), ref_param_dtype="", logprob_config=LogprobConfig())
    base = reference.fingerprint({"train": pairs}, **kw)
    assert reference.fingerprint({"train": pairs}, **kw) == base
    edited = [dict(p) for p in pairs]
    edited[2] = dict(edited[2], chosen=edited[2]["chosen"][:-1])
    changes = [({"train": edited}, {}), ({"train": pairs}, dict(pad_id=1)),
               ({"train": pairs}, dict(ref_checksum=[[1.5]])),
               ({"train": pairs}, dict(model_config=preset("tiny-gpt2", n_layer=3))),
               ({"train": pairs}, dict(logprob_config=LogprobConfig(vocab_chunk=16))),
               ({"train": pairs}, dict(ref_source={"reference": "/other"}))]
    for splits, change in changes:
        assert reference.fingerprint(splits, **{**kw, **change}) != base, change
    params = {"a": np.arange(6, dtype=np.float32), "b": np.ones((2, 2), np.float32)}
    swapped = {"a": params["a"][::-1].copy(), "b": params["b"]}
    assert reference.param_checksum(params) != reference.param_checksum(swapped)
