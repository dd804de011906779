"""Preference-tree rows (``data.format='trees'``, ``dpo_jax/data/tree_data.py``): conversations
with alternatives and Step-DPO rows, read from local files, tokenised branch point by branch
point exactly as the same pairs are, bad rows named by file, row and field; the pipeline's
batches through the eval step, with per-depth metrics equal to the unrolled pairs' by depth."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpo_jax import batch_format
from dpo_jax.data import loading, tree_data
from dpo_jax.data.errors import BadRows, DataError
from dpo_jax.data.sources import RawPair
from dpo_jax.data.testing import chatml_tokenizer
from dpo_jax.data.tokenize import PairTokenizer
from dpo_jax.models import Model, preset
from dpo_jax.step import TREE_DEPTHS, StepConfig, make_eval_step
from tests import helpers

jax.config.update("jax_default_matmul_precision", "highest")


def _conversation(i: int, turns: int = 3, three_way: bool = True) -> dict:
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}]
    for t in range(turns):
        m = {"role": "assistant", "content": f"It is {2 * i + t}."}
        if t != 1:  # turn 1 has no alternative: no branch point there
            m["rejected"] = f"Maybe {i + t}." if t == 0 else [f"No idea {t}.", f"Sure {i}."][
                :2 if three_way else 1]
        if t == 2:
            m["weight"] = 0.5
        msgs += [m, {"role": "user", "content": f"And then {t}?"}]
    return {"messages": msgs[:-1]}


def _steps(i: int) -> list[dict]:
    prompt = f"Solve {i} times 3, step by step."
    return [{"prompt": prompt, "initial_reason_steps": "", "chosen": f"Step 1: {i} * 3.",
             "rejected": f"Step 1: {i} + 3."},
            {"prompt": prompt, "initial_reason_steps": f"Step 1: {i} * 3.\n",
             "chosen": f"Step 2: it is {3 * i}.", "rejected": "Step 2: it is 7."}]


def _cfg(path, **fields):
    return helpers.data_config(source="generic", path=path, tokenizer="unused", format="trees",
                               eval_split="train", eval_fraction=0.0, **fields)


def _encode(rows, tmp_path, tok, **fields):
    path = helpers.write_jsonl(tmp_path / "trees.jsonl", rows)
    cfg = loading.config_lib.read_data(_cfg(path, **fields))
    items, stats = loading.load_tokenised_items(cfg, "train", tok)
    return items, stats, cfg, path


def test_conversation_branch_points_are_tokenised_as_their_pairs(tmp_path):
    """Each branch point of a conversation has exactly the tokens of the pair (history
    messages, chosen, rejected) through the pair tokenizer (chat template, one turn end per
    response); the chosen answer continues the history; a list of rejected texts is a 3-way
    branch point ranked in order; message weights and the depth decay multiply."""
    tok = chatml_tokenizer()
    rows = [_conversation(i) for i in range(3)]
    items, stats, cfg, path = _encode(rows, tmp_path, tok, tree_responses=3,
                                      tree_depth_decay=0.8)
    assert len(items) == 3 and stats["lengths"]["tree"]["max"] > 0
    encoder = PairTokenizer(tok, cfg)
    for row, item in zip(rows, items):
        bps = item["branch_points"]
        msgs = row["messages"]
        at = [i for i, m in enumerate(msgs) if "rejected" in m]
        assert [bp.depth for bp in bps] == [0, 1]
        assert [bp.weight for bp in bps] == pytest.approx([1.0, 0.5 * 0.8])
        assert [len(bp.responses) for bp in bps] == [2, 3] and bps[1].ranks == [0, 1, 2]
        for bp, i in zip(bps, at):
            history = [{"role": m["role"], "content": m["content"]} for m in msgs[:i]]
            rejected = msgs[i]["rejected"]
            for r, text in zip(bp.responses[1:], [rejected] if isinstance(rejected, str)
                               else rejected):
                (pair,), _ = encoder.encode([RawPair(history, msgs[i]["content"], text,
                                                     file=path, row=0)], BadRows())
                np.testing.assert_array_equal(bp.history, pair["prompt"])
                np.testing.assert_array_equal(bp.responses[0], pair["chosen"])
                np.testing.assert_array_equal(r, pair["rejected"])
                assert pair["chosen"][-1] == encoder.turn_end
        # the second history starts with the first history and its chosen answer
        first = np.concatenate([bps[0].history, bps[0].responses[0]])
        np.testing.assert_array_equal(bps[1].history[:len(first)], first)


def test_step_dpo_rows_with_one_prompt_form_one_tree(tmp_path):
    """Step-DPO rows (prompt, initial_reason_steps, chosen, rejected) of one prompt are one tree
    whose branch points are the pairs (prompt + steps, chosen, rejected)."""
    tok = chatml_tokenizer()
    rows = _steps(1) + _steps(2)
    items, _, cfg, path = _encode(rows, tmp_path, tok)
    assert [len(it["branch_points"]) for it in items] == [2, 2]
    encoder = PairTokenizer(tok, cfg)
    for it, pair_rows in zip(items, (rows[:2], rows[2:])):
        for depth, (bp, r) in enumerate(zip(it["branch_points"], pair_rows)):
            (pair,), _ = encoder.encode([RawPair(r["prompt"] + r["initial_reason_steps"],
                                                 r["chosen"], r["rejected"], file=path,
                                                 row=0)], BadRows())
            assert bp.depth == depth
            np.testing.assert_array_equal(bp.history, pair["prompt"])
            np.testing.assert_array_equal(bp.responses[0], pair["chosen"])
            np.testing.assert_array_equal(bp.responses[1], pair["rejected"])


@pytest.mark.parametrize("row,field,reason", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]},
     "messages", "no_branch_point"),
    ({"messages": [{"role": "user", "content": "hi", "rejected": "x"}]},
     r"messages\[0\].rejected", "bad_format"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "a", "rejected": 3}]},
     r"messages\[1\].rejected", "bad_type"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "a", "rejected": "b", "weight": -1}]},
     r"messages\[1\].weight", "bad_weight"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "", "rejected": "b"}]},
     r"messages\[1\].content", None),
    ({"prompt": "p", "chosen": "a"}, "rejected", "missing_field"),
])
def test_bad_rows_name_file_row_and_field(tmp_path, row, field, reason):
    """A bad row raises DataError naming the file, the row (1 here: after a good row) and
    the field; with on_bad_row='skip' it is counted and the good tree kept."""
    tok = chatml_tokenizer()
    rows = [_conversation(0, turns=1), row]
    with pytest.raises(DataError, match=rf"trees.jsonl.*row 1.*{field}") as e:
        _encode(rows, tmp_path, tok)
    if reason is not None:
        assert e.value.reason == reason
    items, stats, _, _ = _encode(rows, tmp_path, tok, on_bad_row="skip")
    assert len(items) == 1 and sum(stats["bad_rows_skipped"].values()) == 1


def test_config_refuses_what_trees_do_not_support():
    from dpo_jax.config import base_config, read_config

    def config(**data):
        c = base_config()
        c.data.update(source="generic", path="x.jsonl", tokenizer="t", format="trees", **data)
        return c

    read_config(config())
    for fields, loss, match in [({"prefix_sharing": True}, "sigmoid", "prefix_sharing"),
                                ({"tree_responses": 3}, "sigmoid", "plackett_luce"),
                                ({}, "plackett_luce", "plackett_luce"),
                                ({"tree_depth_decay": 0.0}, "sigmoid", "tree_depth_decay")]:
        c = config(**fields)
        c.loss.name = loss
        with pytest.raises(ValueError, match=match):
            read_config(c)
    c = config(tree_responses=3)
    c.loss.name = "plackett_luce"
    assert batch_format.for_run(read_config(c).data) == batch_format.BatchFormat(
        "ranked", packed=True, tree=True)


def test_pipeline_batches_and_per_depth_eval_metrics(tmp_path):
    """The tree pipeline's eval batches (packed, 2 trees per batch, padded slots weight 0)
    through the eval step: overall and per-depth metrics equal the unrolled pairs' with the
    same weights, restricted to each depth; the stats count the columns saved."""
    tok = chatml_tokenizer()
    rows = [_conversation(i, three_way=False) for i in range(3)] + _steps(4)
    path = helpers.write_jsonl(tmp_path / "trees.jsonl", rows)
    cfg = _cfg(path, packing=True, buckets="256", row_multiple=1)
    pipe = loading.build_pipeline(cfg, split="eval", global_batch_size=2, tokenizer=tok)
    assert isinstance(pipe, tree_data.TreePipeline)
    stats = pipe.stats
    assert stats["num_trees"] == 4 and stats["branch_points"] == 8
    assert 0 < stats["tree_columns"] < stats["unrolled_columns"]
    model = Model(preset("tiny-llama", vocab_size=512, max_len=512))
    params, ref_params = helpers.init_params(model), helpers.init_params(model, seed=1)
    loss_cfg = helpers.loss_config(beta=0.5)
    fmt = batch_format.for_run(pipe.cfg)
    from dpo_jax.eval_metrics import means, totals
    from dpo_jax.logprobs import max_scored_tokens

    def run(batches, fmt_):
        step_ = jax.jit(make_eval_step(model, loss_cfg, StepConfig(), fmt=fmt_),
                        static_argnums=3)
        return means(totals(lambda b: jax.device_get(step_(
            params, helpers.Frozen(reference=ref_params), {k: jnp.asarray(v) for k, v in
                                                           b.items()},
            max_scored_tokens(b["loss_mask"]))), batches))

    batches = list(pipe)
    assert len(batches) == 2 and all(b["pair_weight"].shape == (2 * pipe.max_bp,)
                                     for b in batches)
    got = run(batches, fmt)
    bps = [bp for i in range(len(pipe.pairs)) for bp in pipe.items_of(i)]
    pairs = [{"prompt": bp.history, "chosen": bp.responses[0], "rejected": bp.responses[1]}
             for bp in bps]
    weights = np.asarray([bp.weight for bp in bps], np.float32)
    depths = np.asarray([bp.depth for bp in bps])
    plain = helpers.pair_batch(pairs)
    want = {}
    for d in [None] + list(range(TREE_DEPTHS)):
        sel = np.ones_like(weights) if d is None else (depths == d)
        m = run([dict(plain, pair_weight=weights * sel)], batch_format.infer(plain))
        for k in ("loss", "rewards/accuracies", "rewards/margins"):
            want[k if d is None else f"depth_{d}/{k}"] = m[k] if sel.any() else 0.0
        if d is not None:
            want[f"depth_{d}/branch_points"] = float((weights * sel).sum())
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=2e-5, abs=2e-6), k
    assert got["depth_1/branch_points"] > 0 and got["depth_3/branch_points"] == 0


def test_a_tiny_dpo_run_on_trees(tmp_path):
    """task 'dpo' end to end on a tree file (chat template, packing, per-branch-point weights):
    it trains, evaluates with per-depth metrics and reports the trees' stats."""
    from tests import runs

    tok = chatml_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    rows = [_conversation(i, three_way=False) for i in range(24)] + [
        r for i in range(8) for r in _steps(i)]
    path = helpers.write_jsonl(tmp_path / "trees.jsonl", rows)
    c = runs.dpo_config(steps=2, batch_size=8, eval_batch_size=8, eval_every=2)
    c.data.update(source="generic", path=path, tokenizer=str(tmp_path / "tok"), format="trees",
                  eval_split="", eval_fraction=0.25, buckets="256", packing=True,
                  tree_depth_decay=0.5)
    c.model.overrides.update(vocab_size=len(tok), max_len=512)
    summary = runs.run(c, tmp_path / "run")
    final = summary["final_eval"]
    assert np.isfinite(final["loss"]) and final["depth_0/branch_points"] > 0
    assert final["depth_1/branch_points"] > 0 and final["depth_3/branch_points"] == 0
