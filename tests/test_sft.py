"""The SFT task: numpy NLL parity of the step and the eval sums (packed and unpacked), the
Unlikelihood formula, learning end to end, settings the task refuses, token files.

Step tests call ``dpo_jax.sft``'s pure functions with a tiny model and real ``TextPipeline`` /
``PreferencePipeline`` batches (``tests/helpers.py``); end-to-end tests run
``sft.train_and_evaluate`` on ``tests/runs.py``'s tiny config. Exact resume of the task:
``tests/test_resume.py``."""

import os

import jax
import numpy as np
import pytest

from dpo_jax import eval_metrics, sft
from dpo_jax.data.text import TextPipeline, read_token_examples, write_token_examples
from dpo_jax.logprobs import LogprobConfig
from tests import helpers, runs

jax.config.update("jax_default_matmul_precision", "highest")

# A tiled training head (chunks of positions and of the vocabulary): the numbers must not depend
# on the tiling.
LP = LogprobConfig(scored_only=True, seq_chunk=16, vocab_chunk=48)


def _np_token_logps(model, params, batch_np):
    """Numpy log p of each next token from full float64 logits: ``(logps [R, L-1],
    mask [R, L-1], slot [R, L-1])``; ``slot`` is the sequence (``seq_index`` or row)."""
    logits = np.asarray(model.logits(params, batch_np["input_ids"], batch_np["positions"],
                                     batch_np["segment_ids"]), np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ids = batch_np["input_ids"]
    lp = np.take_along_axis(logits[:, :-1], ids[:, 1:, None], -1)[..., 0] - logz[:, :-1]
    mask = batch_np["loss_mask"][:, 1:]
    if "seq_index" in batch_np:
        slot = np.where(mask > 0, batch_np["seq_index"][:, 1:], 0)
    else:
        slot = np.broadcast_to(np.arange(ids.shape[0])[:, None], mask.shape)
    return lp, mask, slot


def _examples(num, seed):
    """(prompt, chosen) of synthetic pairs as SFT examples, as ``text.load_examples`` builds them."""
    return [{"prompt": p["prompt"], "response": p["chosen"]}
            for p in helpers.synthetic_pairs(num, seed=seed)]


def _text_stream(examples, batch_size, *, train, target, packing):
    # Packed row counts divisible by the 8 batch shards of helpers.mesh(), as the task passes.
    return TextPipeline(examples, helpers.data_config(buckets="32", packing=packing),
                        train=train, global_batch_size=batch_size, target=target,
                        row_multiple=8)


@pytest.mark.parametrize("packing,target", [(False, "response"), (True, "text")])
def test_step_and_eval_equal_the_numpy_token_mean_nll(packing, target):
    model = helpers.tiny_model()
    params = helpers.init_params(model)
    tx, schedule = helpers.optimizer()
    state = helpers.train_state(model, params, tx)

    # Eval: the token mean over every held-out example, the 12 padding copies of the last
    # batch (16 + 4 real examples) excluded.
    eval_stream = _text_stream(_examples(20, seed=1), 16, train=False, target=target,
                               packing=packing)
    assert eval_stream.num_batches == 2
    total = tokens = 0.0
    for eval_np in eval_stream:
        lp, mask, slot = _np_token_logps(model, params, eval_np)
        w = eval_np["example_weight"][slot] * mask
        total, tokens = total - (w * lp).sum(), tokens + w.sum()
    eval_sums = jax.jit(lambda p, b, n: sft.nll_sums(model, p, b, LP, n), static_argnums=2)
    got = eval_metrics.reduce(
        lambda b: sft.token_metrics(eval_sums(state.trainable, *helpers.device_batch(b))),
        eval_stream, derived=lambda means: sft.objective(means, 1.0))
    assert got["nll"] == pytest.approx(total / tokens, rel=1e-5)
    assert got["ppl"] == pytest.approx(np.exp(total / tokens), rel=1e-5)

    # Train step: its metrics are the token mean at the parameters before the update.
    batch_np = _text_stream(_examples(64, seed=0), 16, train=True, target=target,
                            packing=packing).batch_at(0, 0)
    assert ("seq_index" in batch_np) == packing
    lp, mask, slot = _np_token_logps(model, params, batch_np)
    w = batch_np["example_weight"][slot] * mask
    want = -(w * lp).sum() / w.sum()
    real = (batch_np["segment_ids"] > 0).sum()
    if target == "text":  # every token after the first of each sequence is scored
        firsts = (batch_np["positions"] == 0) & (batch_np["segment_ids"] > 0)
        assert mask.sum() == real - firsts.sum()
    else:  # prompt tokens are not scored
        assert mask.sum() < real - batch_np["input_ids"].shape[0]
    train_step = jax.jit(sft.make_sft_train_step(model, "nll", 1.0, tx, schedule, LP),
                         static_argnums=2)
    new_state, metrics = train_step(state, *helpers.device_batch(batch_np))
    assert float(metrics["loss"]) == pytest.approx(want, rel=1e-5)
    assert float(metrics["ppl"]) == pytest.approx(np.exp(want), rel=1e-5)
    assert int(new_state.step) == 1 and float(metrics["nonfinite"]) == 0.0


def test_unlikelihood_step_equals_the_formula():
    """On a preference batch (rows: 8 chosen, then 8 rejected): ``mean_t[-log p(y_w,t)] +
    alpha * mean_t[-log(1 - p(y_l,t))]``, ``1 - p`` clamped at 1e-5."""
    model = helpers.tiny_model()
    params = helpers.init_params(model)
    tx, schedule = helpers.optimizer()
    B, alpha = 8, 0.5
    batch_np = helpers.pair_batch(helpers.synthetic_pairs(B), buckets="32")
    lp, mask, slot = _np_token_logps(model, params, batch_np)
    chosen = (slot < B) * mask
    rejected = (slot >= B) * mask
    nll = -(chosen * lp).sum() / chosen.sum()
    ul = -(rejected * np.log(np.maximum(1 - np.exp(lp), 1e-5))).sum() / rejected.sum()
    train_step = jax.jit(sft.make_sft_train_step(model, "unlikelihood", alpha, tx, schedule, LP),
                         static_argnums=2)
    _, metrics = train_step(helpers.train_state(model, params, tx),
                            *helpers.device_batch(batch_np))
    assert float(metrics["nll"]) == pytest.approx(nll, rel=1e-5)
    assert float(metrics["ul"]) == pytest.approx(ul, rel=1e-4)
    assert float(metrics["loss"]) == pytest.approx(nll + alpha * ul, rel=1e-5)


def test_memorises_a_tiny_dataset_through_the_task_registry(tmp_path):
    c = runs.sft_config(steps=40, eval_every=40)
    c.data.synthetic.num_train = 16
    c.data.synthetic.num_eval = 16
    c.data.synthetic.eval_seed = c.data.synthetic.train_seed  # eval on the memorised examples
    c.optim.lr = 1e-2
    c.optim.warmup_steps = 0
    summary = runs.run(c, tmp_path)  # get_task('sft')
    log = runs.records(tmp_path)
    first = log[0]["loss"]
    assert {"loss", "nll", "ppl", "tokens_per_s"} <= set(log[0])
    assert summary["final_train"]["loss"] < 0.5 * first
    assert summary["final_eval"]["nll"] < 0.5 * first
    assert summary["final_eval"]["ppl"] == pytest.approx(np.exp(summary["final_eval"]["nll"]))


@pytest.mark.parametrize("field,value", [("logprobs.precompute_reference", True)])
def test_settings_the_task_cannot_honour_are_refused_before_training(tmp_path, field, value):
    """SFT has no reference model, so a precomputed reference is a config error (not a crash
    deep in the setup). The error names the field. (It accumulates gradients:
    ``test_grad_accum.py``.)"""
    c = runs.sft_config()
    block, name = field.split(".")
    c[block][name] = value
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        runs.run(c, tmp_path)
    assert not os.path.exists(tmp_path / "checkpoints")
    assert runs.records(tmp_path) == []


def test_token_file_roundtrip(tmp_path):
    path = str(tmp_path / "t.jsonl.gz")
    write_token_examples([{"prompt": [5, 6], "response": [7, 0]}, {"response": [9, 9, 0]}],
                         path)
    got = read_token_examples(path)
    assert [g["prompt"].tolist() for g in got] == [[5, 6], []]
    assert [g["response"].tolist() for g in got] == [[7, 0], [9, 9, 0]]
