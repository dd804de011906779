"""Ranked lists (data.format='ranked', loss plackett_luce) and unpaired completions
(data.format='unpaired', loss kto): parsing, tokenisation, batch layout, the step (pairs are the
K = 2 case exactly), meshes, gradient accumulation and exact resume."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dpo_jax.data import loading, ranked, unpaired
from dpo_jax.data.errors import DataError
from dpo_jax.step import StepConfig, make_train_step, sequence_stats
from tests import helpers, runs

jax.config.update("jax_default_matmul_precision", "highest")
MESHES = {"dp": {"data": 8, "fsdp": 1, "tensor": 1}, "fsdp": {"data": 1, "fsdp": 8, "tensor": 1},
          "mixed": {"data": 2, "fsdp": 2, "tensor": 2}}


def _ranked_items(n, seed=0, k=4):
    task = helpers.SyntheticTask()
    from dpo_jax.data.synthetic import make_ranked

    out = []
    for i, it in enumerate(make_ranked(task, n, seed, k)):
        kk = k if i % 3 else 2  # every third list has only 2 responses: masked slots
        out.append(ranked._checked_list(it["prompt"], it["responses"][:kk],
                                        list(it["scores"][:kk]), end_ids={0}, is_blank=None,
                                        file="synthetic", row=i))
    return out


def _as_ranked(pairs):
    return [{"prompt": p["prompt"], "responses": [p["chosen"], p["rejected"]],
             "scores": np.array([1.0, 0.0], np.float32), "ranks": np.array([0, 1], np.int32)}
            for p in pairs]


def _batch(pipe_cls, items, batch_size=None, **fields):
    cfg = helpers.data_config(**fields)
    return next(iter(pipe_cls(items, cfg, train=False, global_batch_size=batch_size or len(items),
                              pad_id=0)))


def _step(model, params, ref_params, batch_np, loss_cfg, mesh_, step_cfg=None):
    tx, schedule = helpers.optimizer()
    step_cfg = step_cfg or StepConfig()
    step = jax.jit(make_train_step(model, loss_cfg, tx, schedule, step_cfg), static_argnums=2)
    state = helpers.train_state(model, params, tx, ref_params=ref_params, mesh_=mesh_)
    new_state, metrics = step(state, *helpers.device_batch(batch_np, mesh_))
    return jax.device_get(new_state.trainable), jax.device_get(metrics)


# ----------------------------------------------------------------------------- data


def test_competition_ranks_and_sorting():
    np.testing.assert_array_equal(ranked.competition_ranks([3.0, 1.0, 3.0, 0.5]), [0, 2, 0, 3])
    r = ranked.ranked("p", ["a", "b", "c"], [1, 5, 1], "f", 3, "scores")
    assert r.responses == ["b", "a", "c"] and r.scores == [5.0, 1.0, 1.0]
    with pytest.raises(DataError, match="finite"):
        ranked.ranked("p", ["a", "b"], [1, None], "f", 3, "scores")
    with pytest.raises(DataError, match="two responses"):
        ranked.ranked("p", ["a"], [1], "f", 3, "scores")


def test_ranked_batch_layout_with_masked_slots():
    items = _ranked_items(6)
    batch = _batch(ranked.RankedPipeline, items)
    B, K = 6, 4
    assert batch["input_ids"].shape[0] == K * B and batch["slot_rank"].shape == (B, K)
    for j, it in enumerate(items):
        for k in range(K):
            row = k * B + j
            if k < len(it["responses"]):
                assert batch["slot_rank"][j, k] == it["ranks"][k]
                n = len(it["prompt"]) + len(it["responses"][k])
                np.testing.assert_array_equal(batch["input_ids"][row, :n],
                                              np.concatenate([it["prompt"],
                                                              it["responses"][k]]))
                assert batch["loss_mask"][row].sum() == len(it["responses"][k])
            else:
                assert batch["slot_rank"][j, k] == -1 and batch["loss_mask"][row].sum() == 0


def test_generic_and_ultrafeedback_files_tokenise_like_pairs(tmp_path):
    tok = helpers.shared_gpt2_tokenizer()
    rows = [{"prompt": f"Question {i}:", "responses": [" yes", " no", " maybe so", " no"],
             "scores": [2, 9, 2, 1]} for i in range(6)]
    path = helpers.write_jsonl(tmp_path / "ranked.jsonl", rows)
    cfg = helpers.data_config(source="generic", path=path, tokenizer="gpt2", format="ranked",
                              eval_fraction=0.0, eval_split="train")
    items, stats = loading.load_tokenised_items(cfg, "train", tok)
    assert len(items) == 6 and stats["bad_rows_skipped"] == {}
    it = items[0]
    # sorted best first; the duplicate ' no' kept once (its better score); ties share a rank
    assert [tok.decode(r) for r in it["responses"]] == [" no<|endoftext|>", " yes<|endoftext|>",
                                                        " maybe so<|endoftext|>"]
    np.testing.assert_array_equal(it["ranks"], [0, 1, 1])
    # the same tokens as the pair tokenizer gives chosen / rejected
    pair_path = helpers.write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Question 0:", "chosen": " no", "rejected": " maybe so"}])
    pcfg = helpers.data_config(source="generic", path=pair_path, tokenizer="gpt2",
                               eval_fraction=0.0, eval_split="train")
    from dpo_jax.data import load_tokenised_pairs

    pairs, _ = load_tokenised_pairs(pcfg, "train", tok)
    np.testing.assert_array_equal(pairs[0]["prompt"], it["prompt"])
    np.testing.assert_array_equal(pairs[0]["chosen"], it["responses"][0])
    np.testing.assert_array_equal(pairs[0]["rejected"], it["responses"][2])
    # UltraFeedback's rated-completions format (a chat template renders the instruction)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
    uf = [{"instruction": f"Say {i}", "completions": [
        {"response": " one", "overall_score": 3.5,
         "annotations": {"helpfulness": {"Rating": "2"}, "honesty": {"Rating": "N/A"}}},
        {"response": " two", "overall_score": 7.0,
         "annotations": {"helpfulness": {"Rating": "5"}}}]} for i in range(4)]
    ucfg = helpers.data_config(source="ultrafeedback", path=helpers.write_jsonl(
        tmp_path / "uf.jsonl", uf), tokenizer="gpt2", format="ranked", eval_fraction=0.0,
        eval_split="train")
    items, _ = loading.load_tokenised_items(ucfg, "train", tok)
    assert tok.decode(items[0]["prompt"]) == "user: Say 0\nassistant:"
    assert tok.decode(items[0]["responses"][0]) == "  two\n<|endoftext|>"
    ucfg.field_scores = "annotations"
    items, _ = loading.load_tokenised_items(ucfg, "train", tok)
    assert tok.decode(items[0]["responses"][0]) == "  two\n<|endoftext|>"


def test_unpaired_from_pairs_and_kl_slot():
    pairs = helpers.synthetic_pairs(8)
    items = [unpaired.checked_unpaired(it, end_ids={0}, is_blank=None, file="s", row=i)
             for i, it in enumerate(unpaired.unpair_tokens(pairs))]
    assert len(items) == 16 and [it["desirable"] for it in items[:4]] == [True, False] * 2
    batch = _batch(unpaired.UnpairedPipeline, items, format="unpaired")
    B = 16
    np.testing.assert_array_equal(batch["desirable"], [float(it["desirable"]) for it in items])
    for j, it in enumerate(items):
        prev = items[(j - 1) % B]["completion"]
        n = len(it["prompt"])
        np.testing.assert_array_equal(batch["input_ids"][j, :n + len(it["completion"])],
                                      np.concatenate([it["prompt"], it["completion"]]))
        np.testing.assert_array_equal(batch["input_ids"][B + j, :n + len(prev)],
                                      np.concatenate([it["prompt"], prev]))
        assert batch["loss_mask"][B + j].sum() == len(prev)


def test_unpaired_generic_rows_and_pair_rows(tmp_path):
    cfg = helpers.data_config(source="generic", format="unpaired")
    got = unpaired.parse_unpaired_generic({"prompt": "p", "completion": "c", "label": False},
                                          "f", 0, cfg)
    assert [(u.completion, u.label) for u in got] == [("c", False)]
    got = unpaired.parse_unpaired_generic({"prompt": "p", "chosen": "a", "rejected": "b"},
                                          "f", 1, cfg)
    assert [(u.completion, u.label) for u in got] == [("a", True), ("b", False)]
    with pytest.raises(DataError, match="bool"):
        unpaired.parse_unpaired_generic({"prompt": "p", "completion": "c", "label": "yes"},
                                        "f", 2, cfg)


# ----------------------------------------------------------------------------- the step


@pytest.mark.default_emitters  # bit for bit across two programs (conftest.py)
def test_pairs_are_the_k2_case_exactly():
    """The same pairs as ranked lists of two, trained with plackett_luce, give the sigmoid
    step's loss, metrics and update bit for bit."""
    model = helpers.tiny_model()
    params, ref_params = helpers.init_params(model), helpers.init_params(model, seed=1)
    pairs = helpers.synthetic_pairs(8)
    pair_batch = helpers.pair_batch(pairs)
    list_batch = _batch(ranked.RankedPipeline, _as_ranked(pairs))
    np.testing.assert_array_equal(list_batch["input_ids"], pair_batch["input_ids"])
    want = _step(model, params, ref_params, pair_batch, helpers.loss_config(beta=0.5),
                 helpers.mesh())
    got = _step(model, params, ref_params, list_batch,
                helpers.loss_config("plackett_luce", beta=0.5), helpers.mesh())
    for k in ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies",
              "logps/chosen", "logps/rejected", "grad_norm"):
        assert got[1][k] == want[1][k], k
    runs.assert_same_params(got[0], want[0])


def _ranked_setup():
    model = helpers.tiny_model()
    return (model, helpers.init_params(model), helpers.init_params(model, seed=1),
            _batch(ranked.RankedPipeline, _ranked_items(8)))


def test_ranked_step_matches_numpy_plackett_luce():
    model, params, ref_params, batch_np = _ranked_setup()
    batch, max_scored = helpers.device_batch(batch_np)
    cfg = StepConfig()
    pol = np.asarray(sequence_stats(model, params, batch, cfg, max_scored).logps, np.float64)
    ref = np.asarray(sequence_stats(model, ref_params, batch, cfg, max_scored).logps, np.float64)
    c_BK = (pol - ref).reshape(4, -1).T
    mask = batch_np["slot_rank"] >= 0
    from tests.test_plackett_luce import np_pl

    want, _ = np_pl(c_BK, mask.astype(np.float32), 0.5, ranks_BK=batch_np["slot_rank"])
    _, metrics = _step(model, params, ref_params, batch_np,
                       helpers.loss_config("plackett_luce", beta=0.5), helpers.mesh())
    np.testing.assert_allclose(metrics["loss"], want.mean(), rtol=1e-5)


@pytest.mark.parametrize("mesh_name", [m if m == "mixed" else pytest.param(m, marks=pytest.mark.slow) for m in MESHES])
def test_ranked_step_on_every_mesh_and_accumulated(mesh_name):
    model, params, ref_params, batch_np = _ranked_setup()
    loss_cfg = helpers.loss_config("plackett_luce", beta=0.5)
    want = _step(model, params, ref_params, batch_np, loss_cfg, helpers.mesh())
    got = _step(model, params, ref_params, batch_np, loss_cfg, helpers.mesh(MESHES[mesh_name]),
                StepConfig(grad_accum=2 if mesh_name == "dp" else 1))
    for k in ("loss", "rewards/accuracies", "rewards/rank_1", "logps/rejected", "grad_norm"):
        np.testing.assert_allclose(got[1][k], want[1][k], rtol=2e-5, atol=2e-6, err_msg=k)
    # SGD with lr 1: the update is the gradient; equal to 1e-5 of its norm
    before = helpers.leaves(params)
    diff = [g - w for g, w in zip(helpers.leaves(got[0]), helpers.leaves(want[0]))]
    update = [w - b for w, b in zip(helpers.leaves(want[0]), before)]
    assert helpers.global_norm(diff) < 1e-5 * helpers.global_norm(update)


@pytest.mark.parametrize("mesh_name", [m if m == "mixed" else pytest.param(m, marks=pytest.mark.slow) for m in MESHES])
def test_kto_step_matches_numpy_on_every_mesh(mesh_name):
    """KTO through the step on a pair dataset split into unpaired rows equals the numpy loss
    on the step's own log-probs, with z0 from the mismatched (previous example's) completions."""
    model = helpers.tiny_model()
    params, ref_params = helpers.init_params(model), helpers.init_params(model, seed=1)
    items = [unpaired.checked_unpaired(it, end_ids={0}, is_blank=None, file="s", row=i)
             for i, it in enumerate(unpaired.unpair_tokens(helpers.synthetic_pairs(8)))]
    batch_np = _batch(unpaired.UnpairedPipeline, items, format="unpaired")
    batch, max_scored = helpers.device_batch(batch_np)
    pol = np.asarray(sequence_stats(model, params, batch, StepConfig(), max_scored).logps)
    ref = np.asarray(sequence_stats(model, ref_params, batch, StepConfig(), max_scored).logps)
    from tests.test_kto import np_kto

    B = 16
    want, z0 = np_kto(pol[:B], ref[:B], pol[B:], ref[B:], batch_np["desirable"],
                      np.ones(B), 0.5, 1.0, 1.0)
    _, metrics = _step(model, params, ref_params, batch_np, helpers.loss_config("kto", beta=0.5),
                       helpers.mesh(MESHES[mesh_name]))
    np.testing.assert_allclose(metrics["loss"], want.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["kl"], z0, rtol=1e-4, atol=1e-5)


def test_kto_refuses_grad_accum_and_pairs_refuse_kto():
    model = helpers.tiny_model()
    tx, schedule = helpers.optimizer()
    with pytest.raises(ValueError, match="batch statistics"):
        make_train_step(model, helpers.loss_config("kto"), tx, schedule, StepConfig(grad_accum=2))


# ----------------------------------------------------------------------------- runs


@pytest.mark.parametrize("fmt,loss", [("ranked", "plackett_luce"),
                                      pytest.param("unpaired", "kto", marks=pytest.mark.slow)])
def test_run_resumes_exactly(tmp_path, fmt, loss):
    c = runs.format_config(fmt, loss, steps=4, batch_size=8, checkpoint_every=2)
    c.data.buckets = "48"
    if fmt == "ranked":
        c.data.synthetic.num_responses = 3
    runs.resume_matches_full_run(c, tmp_path, interrupt_after=3, resumed_from=2)
    recs = runs.records(tmp_path / "full")
    assert len(recs) == 4 and all(np.isfinite(r["loss"]) for r in recs)
    if fmt == "unpaired":
        assert "kl" in recs[0]
    else:
        assert "rewards/rank_2" in recs[0]


def test_synthetic_lists_binarised_and_labelled():
    from dpo_jax.data import synthetic

    task = helpers.SyntheticTask()
    lists = synthetic.make_ranked(task, 50, 3, 4)
    assert all(np.all(np.diff(it["scores"]) <= 0) for it in lists)
    assert all(synthetic.true_reward(task, it["prompt"], it["responses"][0]) == it["scores"][0]
               for it in lists)
    pairs = synthetic.best_vs_random(lists, 0)
    by_prompt = {it["prompt"].tobytes(): it for it in lists}
    for p in pairs:
        it = by_prompt[p["prompt"].tobytes()]
        score = {r.tobytes(): s for r, s in zip(it["responses"], it["scores"])}
        assert score[p["chosen"].tobytes()] > score[p["rejected"].tobytes()]
    examples = synthetic.labelled(lists)
    assert len(examples) == 200
    assert [e["desirable"] for e in examples[:4]] == list(lists[0]["scores"] >= 0.5)


@pytest.mark.parametrize("fmt,layout", [
    pytest.param("ranked", "prefix_sharing", marks=pytest.mark.slow),
    pytest.param("unpaired", "prefix_sharing", marks=pytest.mark.slow),
    ("ranked", "packing")])
def test_prefix_shared_and_packed_rows_give_the_unshared_step(fmt, layout):
    """data.prefix_sharing (each prompt once, its K responses -- unpaired: the completion and
    the mismatched KL completion -- as branches) and data.packing (several sequences a row,
    empty slots included): the step equals the one-sequence-per-row layout's."""
    model = helpers.tiny_model()
    params, ref_params = helpers.init_params(model), helpers.init_params(model, seed=1)
    if fmt == "ranked":
        items, cls, loss = _ranked_items(8), ranked.RankedPipeline, "plackett_luce"
    else:
        items = [unpaired.checked_unpaired(it, end_ids={0}, is_blank=None, file="s", row=i)
                 for i, it in enumerate(unpaired.unpair_tokens(helpers.synthetic_pairs(4)))]
        cls, loss = unpaired.UnpairedPipeline, "kto"
    fields = {"prefix_sharing": {"prefix_sharing": True},
              "packing": {"packing": True, "pack_length": 128, "buckets": "128"}}[layout]
    batches = [_batch(cls, items, format=fmt), _batch(cls, items, format=fmt, **fields)]
    if layout == "packing":
        assert batches[1]["segment_ids"].max() >= 2
    else:
        assert "branch_ids" in batches[1] and batches[1]["input_ids"].shape[0] == len(items)
    steps = [_step(model, params, ref_params, b, helpers.loss_config(loss, beta=0.5),
                   helpers.mesh()) for b in batches]
    for k in ("loss", "rewards/accuracies", "logps/chosen", "logps/rejected", "grad_norm"):
        np.testing.assert_allclose(steps[1][1][k], steps[0][1][k], rtol=2e-5, atol=2e-6,
                                   err_msg=k)


def test_config_pairs_each_format_with_its_loss():
    from dpo_jax.config import base_config, read_config

    c = base_config()
    c.data.format = "ranked"
    with pytest.raises(ValueError, match="plackett_luce"):
        read_config(c)
    c.loss.name, c.task = "plackett_luce", "reward"
    with pytest.raises(ValueError, match="task 'dpo'"):
        read_config(c)
    c = base_config()
    c.loss.name = "kto"
    with pytest.raises(ValueError, match="unpaired"):
        read_config(c)
    c.data.format = "unpaired"
    assert read_config(c).data.format == "unpaired"


def test_pair_views_see_every_response_and_keep_pairs():
    pairs = helpers.synthetic_pairs(3)
    assert ranked.pair_views(pairs) == pairs  # pair indices in check messages unchanged
    items = _ranked_items(3)
    views = ranked.pair_views(items)
    assert len(views) == sum(len(it["responses"]) for it in items)
    np.testing.assert_array_equal(views[-1]["chosen"], items[-1]["responses"][-1])
