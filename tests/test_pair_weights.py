"""``data.weight_field``: a numeric column of the preference file becomes each pair's weight.

Bad weights are DataErrors naming file, row and field; padding pairs keep weight 0; and a file
whose weights zero out half the pairs gives the train step the same loss, metrics and gradients
as the file without those pairs (weighted means everywhere)."""

from __future__ import annotations


import jax
import numpy as np
import pytest

from dpo_jax.data import DataError, build_pipeline, default_data_config
from dpo_jax.data.testing import gpt2_style_tokenizer
from dpo_jax.models import Model
from dpo_jax.step import make_train_step
from tests import helpers

N = 8


def _rows(weights=None):
    rows = [{"prompt": f"Question {i}: hello? ", "chosen": f" Yes {i}{'.' * (i % 3)}",
             "rejected": f" No{'!' * (i % 4)} {i}"} for i in range(N)]
    if weights is not None:
        for r, w in zip(rows, weights):
            r["w"] = w
    return rows


_write = helpers.write_jsonl


def _cfg(path, **kw):
    return helpers.data_config(**{"source": "generic", "path": str(path), "tokenizer": "unused",
                                  "eval_fraction": 0.0, **kw})


def _eval_pipeline(path, batch_size, **kw):
    return build_pipeline(_cfg(path, **kw), split="eval", global_batch_size=batch_size,
                          tokenizer=gpt2_style_tokenizer())


@pytest.mark.parametrize("bad,match", [
    ({"drop": True}, "missing column"), (-0.5, "finite and >= 0"), ("1.0", "must be a number"),
    (True, "must be a number"), (None, "missing column")])
def test_bad_weight_is_a_data_error_naming_file_row_field(tmp_path, bad, match):
    weights = [1.0] * N
    rows = _rows(weights)
    if bad == {"drop": True}:
        del rows[3]["w"]
    else:
        rows[3]["w"] = bad
    path = _write(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=rf"train.jsonl: row 3: field 'w': .*{match}"):
        _eval_pipeline(path, N, weight_field="w", eval_split="train")
    p = _eval_pipeline(path, N, weight_field="w", eval_split="train", on_bad_row="skip")
    assert len(p.pairs) == N - 1 and p.stats["bad_rows_skipped"] == {
        "missing_field" if match == "missing column" else "bad_weight": 1}


def test_weights_reach_pair_weight_and_padding_stays_zero(tmp_path):
    weights = [0.5, 2.0, 0.0, 1.0, 3.0, 1.0, 0.25, 1.5]
    path = _write(tmp_path / "train.jsonl", _rows(weights)[:7])  # 7 pairs, batches of 4
    p = _eval_pipeline(path, 4, weight_field="w", eval_split="train")
    got = np.concatenate([b["pair_weight"] for b in p])
    np.testing.assert_array_equal(got, np.asarray(weights[:7] + [0.0], np.float32))
    unweighted = np.concatenate([b["pair_weight"] for b in _eval_pipeline(path, 4, eval_split="train")])
    np.testing.assert_array_equal(unweighted, [1, 1, 1, 1, 1, 1, 1, 0])


def test_synthetic_source_refuses_weight_field():
    c = default_data_config()
    c.weight_field = "w"
    with pytest.raises(ValueError, match="weight_field"):
        build_pipeline(c, split="train", global_batch_size=4)


@pytest.mark.parametrize("loss", ["sigmoid", pytest.param("dpop", marks=pytest.mark.slow)])
def test_zero_weights_equal_dropping_the_pairs(tmp_path, loss):
    """Weights 0 on the odd pairs: the same loss, metrics and update as the file holding only
    the even pairs (batch of 4 real pairs vs 8 pairs of which 4 weigh 0)."""
    weights = [1.0, 0.0] * (N // 2)
    full = _write(tmp_path / "weighted.jsonl", _rows(weights))
    kept = _write(tmp_path / "kept.jsonl", [r for r in _rows() if int(r["prompt"].split()[1][:-1]) % 2 == 0])
    b_weighted = next(iter(_eval_pipeline(full, N, weight_field="w", eval_split="train")))
    b_kept = next(iter(_eval_pipeline(kept, N // 2, eval_split="train")))
    np.testing.assert_array_equal(b_weighted["pair_weight"], weights)

    tok = gpt2_style_tokenizer()
    model = Model(helpers.tiny_model_config(vocab_size=len(tok)))
    params = helpers.init_params(model, seed=0)
    ref = helpers.perturbed(params, scale=0.05, seed=3)
    tx, schedule = helpers.optimizer()
    step = jax.jit(make_train_step(model, helpers.loss_config(loss, beta=0.5), tx, schedule,
                                   helpers.step_config()), static_argnums=2)
    outs = []
    for b in (b_weighted, b_kept):
        state = helpers.train_state(model, params, tx, ref_params=ref,
                                    mesh_=helpers.mesh({"data": 2, "fsdp": 1, "tensor": 4}))
        batch, max_scored = helpers.device_batch(b, helpers.mesh({"data": 2, "fsdp": 1, "tensor": 4}))
        new_state, metrics = step(state, batch, max_scored)
        outs.append((helpers.leaves(new_state.trainable), jax.device_get(metrics)))
    (p_w, m_w), (p_k, m_k) = outs
    for k in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "grad_norm"):
        np.testing.assert_allclose(float(m_w[k]), float(m_k[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    for a, b in zip(p_w, p_k):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(m_w["grad_norm"]) > 0
