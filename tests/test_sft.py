"""The SFT task: numpy NLL parity (packed and unpacked), Unlikelihood formula, learning, resume."""

import json

import jax
import numpy as np
import pytest

from dpo_jax import sft
from dpo_jax.data.text import read_token_examples, write_token_examples
from dpo_jax.config import base_config
from dpo_jax.tasks import get_task
from tests._interrupt import train_until_killed

jax.config.update("jax_default_matmul_precision", "highest")


def sft_config(**train):
    c = sft.add_sft_config(base_config())
    c.model.overrides.n_layer = 1
    c.model.overrides.d_model = 32
    c.model.overrides.d_ff = 64
    c.data.synthetic.num_train = 64
    c.data.buckets = "32"  # one shape: one compile per step function
    c.data.synthetic.num_eval = 24
    c.train.steps = 4
    c.train.batch_size = 16
    c.train.eval_batch_size = 16
    c.train.eval_every = 0
    c.train.log_every = 1
    c.train.checkpoint_every = 0
    c.train.async_checkpointing = False
    for k, v in train.items():
        c.train[k] = v
    return c


def _np_token_nll(run, batch_np, weight_key="example_weight"):
    """Direct numpy NLL per token of a host batch from full float32 logits."""
    logits = np.asarray(run.model.logits(run.state.params, batch_np["input_ids"],
                                         batch_np["positions"], batch_np["segment_ids"]),
                        np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ids = batch_np["input_ids"]
    lp = np.take_along_axis(logits[:, :-1], ids[:, 1:, None], -1)[..., 0] - logz[:, :-1]
    mask = batch_np["loss_mask"][:, 1:]
    if "seq_index" in batch_np:
        slot = np.where(mask > 0, batch_np["seq_index"][:, 1:], 0)
    else:
        slot = np.broadcast_to(np.arange(ids.shape[0])[:, None], mask.shape)
    return lp, mask, slot


@pytest.mark.parametrize("packing,target", [(False, "response"), (True, "text")])
def test_loss_equals_numpy_nll(tmp_path, packing, target):
    c = sft_config(eval_every=1)
    c.data.packing = packing
    c.sft.target = target
    c.data.synthetic.num_eval = 20  # 16 + 4 real examples; 12 padding copies weigh 0
    run = sft.SFTRun(c, str(tmp_path))
    # Eval: token mean over every held-out example, padding excluded.
    total = tokens = 0.0
    for eval_np in run.eval_data:
        lp, mask, slot = _np_token_nll(run, eval_np)
        w = eval_np["example_weight"][slot] * mask
        total, tokens = total - (w * lp).sum(), tokens + w.sum()
    assert run.eval_data.num_batches == 2
    got = run.evaluate()
    assert got["nll"] == pytest.approx(total / tokens, rel=1e-5)
    assert got["ppl"] == pytest.approx(np.exp(total / tokens), rel=1e-5)
    batch_np = run.train_data.batch_at(0, 0)
    assert ("seq_index" in batch_np) == packing
    lp, mask, slot = _np_token_nll(run, batch_np)
    w = batch_np["example_weight"][slot] * mask
    want = -(w * lp).sum() / w.sum()
    if target == "text":  # every token after the first of each sequence is scored
        firsts = (batch_np["positions"] == 0) & (batch_np["segment_ids"] > 0)
        assert mask.sum() == (batch_np["segment_ids"] > 0).sum() - firsts.sum()
    else:  # prompt tokens are not scored
        assert mask.sum() < (batch_np["segment_ids"] > 0).sum() - batch_np["input_ids"].shape[0]
    batch, num_scored = run._device_batch(batch_np)
    _, metrics = run._train_step(run.state, batch, num_scored)  # metrics at the old params
    # (the state was donated; metrics were computed before the update)
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5)
    assert float(metrics["ppl"]) == pytest.approx(np.exp(want), rel=1e-5)


def test_unlikelihood_equals_formula(tmp_path):
    c = sft_config(eval_every=1)
    c.sft.objective = "unlikelihood"
    c.sft.unlikelihood_alpha = 0.5
    c.train.batch_size = 8
    run = sft.SFTRun(c, str(tmp_path))
    batch_np = run.train_data.batch_at(0, 0)
    lp, mask, slot = _np_token_nll(run, batch_np)
    B = 8
    chosen = (slot < B) * mask
    rejected = (slot >= B) * mask
    nll = -(chosen * lp).sum() / chosen.sum()
    ul = -(rejected * np.log(np.maximum(1 - np.exp(lp), 1e-5))).sum() / rejected.sum()
    batch, num_scored = run._device_batch(batch_np)
    _, metrics = run._train_step(run.state, batch, num_scored)
    assert float(metrics["nll"]) == pytest.approx(nll, rel=1e-5)
    assert float(metrics["ul"]) == pytest.approx(ul, rel=1e-4)
    assert float(metrics["loss"]) == pytest.approx(nll + 0.5 * ul, rel=1e-5)


def test_memorises_a_tiny_dataset_through_the_task_registry(tmp_path):
    c = sft_config(steps=40, batch_size=16, eval_every=40)
    c.data.synthetic.num_train = 16
    c.data.synthetic.num_eval = 16
    c.data.synthetic.eval_seed = c.data.synthetic.train_seed  # eval on the memorised examples
    c.optim.lr = 1e-2
    c.optim.warmup_steps = 0
    summary = get_task("sft")(c, str(tmp_path))
    log = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    first = log[0]["loss"]
    assert {"loss", "nll", "ppl", "tokens_per_s"} <= set(log[0])
    assert summary["final_train"]["loss"] < 0.5 * first
    assert summary["final_eval"]["nll"] < 0.5 * first
    assert summary["final_eval"]["ppl"] == pytest.approx(np.exp(summary["final_eval"]["nll"]))


def test_resume_equals_uninterrupted_run(tmp_path):
    def config():
        c = sft_config(steps=6, checkpoint_every=2)
        c.optim.warmup_steps = 2
        c.train.batch_size = 8
        c.data.synthetic.num_train = 20  # 2 batches per epoch: the resume crosses an epoch
        return c

    full = sft.SFTRun(config(), str(tmp_path / "full"))
    full.train()
    want = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(full.state.params))]
    train_until_killed(sft.SFTRun(config(), str(tmp_path / "cut")), 6)
    resumed = sft.SFTRun(config(), str(tmp_path / "cut"))
    assert resumed.start_step == 4
    resumed.train()
    got = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(resumed.state.params))]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    a = [json.loads(x) for x in open(tmp_path / "full" / "metrics.jsonl")]
    b = [json.loads(x) for x in open(tmp_path / "cut" / "metrics.jsonl")]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert a[-1]["loss"] == b[-1]["loss"]


def test_token_file_roundtrip(tmp_path):
    path = str(tmp_path / "t.jsonl.gz")
    write_token_examples([{"prompt": [5, 6], "response": [7, 0]}, {"response": [9, 9, 0]}],
                         path)
    got = read_token_examples(path)
    assert [g["prompt"].tolist() for g in got] == [[5, 6], []]
    assert [g["response"].tolist() for g in got] == [[7, 0], [9, 9, 0]]
