"""The ``se`` source (StackExchange preferences) on a small local file with the hub dataset's
schema: HTML cleaned and pairs formed as the paper's code does, its 1% test split, bad rows."""

import json

import numpy as np
import pytest

from dpo_jax.data import DataError, default_data_config
from dpo_jax.data.errors import BadRows
from dpo_jax.data.loading import load_raw_pairs, load_tokenised_pairs
from dpo_jax.data.stackexchange import TEST_FRACTION, reference_split, se_pairs, strip_html_tags
from dpo_jax.data.testing import gpt2_style_tokenizer

pytest.importorskip("bs4")


def _row(qid, scores):
    """One row of HuggingFaceH4/stack-exchange-preferences' schema."""
    return {"qid": qid, "question": f"<p>How do I sort list {qid}?</p>\n<pre><code>xs = [3, 1]\n"
                                    f"</code></pre>\n", "date": "2010/01/01",
            "metadata": ["https://stackoverflow.com/questions/1"],
            "answers": [{"answer_id": 10 * qid + i, "author": "a", "author_id": i,
                         "author_profile": "", "selected": i == 0, "pm_score": s,
                         "text": f"<p>Use <code>sorted</code> number {i} for {qid}.</p>"}
                        for i, s in enumerate(scores)]}


def _cfg(path, **kw):
    c = default_data_config()
    c.source, c.path, c.tokenizer = "se", str(path), "unused"
    c.max_length, c.max_prompt_length = 96, 48
    c.update(kw)
    return c


def test_strip_html_keeps_what_the_paper_code_keeps():
    html = ("<p>Hi <a href='x'>link</a> there<br/>again</p>\n<pre><code>a = 1\n</code>"
            "<code>b</code></pre><ul><li>dropped</li></ul><code>c()</code><blockquote>"
            "<p>dropped</p></blockquote>")
    # <p>: its direct text only (the link's text and the <br> go); <pre>: each <code>;
    # a top-level <code>; lists and quotes dropped
    want = "\n\n".join(["Hi  thereagain", "<code>a = 1\n</code>", "<code>b</code>",
                        "<code>c()</code>"])
    assert strip_html_tags(html) == want
    assert strip_html_tags("no tags at all") == ""


def test_pairs_by_score_with_ties_to_the_later_answer():
    prompt, pairs = se_pairs(_row(1, [2, 5, 5]), "f", 0)
    assert prompt == "\n\nHuman: How do I sort list 1?\n\n<code>xs = [3, 1]\n</code>\n\nAssistant:"
    answer = [" Use  number %d for 1." % i for i in range(3)]  # inline <code> dropped
    # (0,1): 5 > 2 -> 1 wins; (0,2): 2 wins; (1,2): equal scores -> the later answer, 2
    assert pairs == [(answer[1], answer[0]), (answer[2], answer[0]), (answer[2], answer[1])]


def test_reference_split_is_datasets_shuffle_seed_42():
    datasets = pytest.importorskip("datasets")
    n = 250
    shuffled = datasets.Dataset.from_dict({"i": list(range(n))}).shuffle(seed=42)["i"]
    k = int(n * TEST_FRACTION)
    assert reference_split(n, "test").tolist() == shuffled[:k]
    assert reference_split(n, "train").tolist() == shuffled[k:]


def test_se_file_through_the_pipeline(tmp_path):
    rng = np.random.default_rng(0)
    rows = [_row(q, rng.integers(0, 10, size=int(rng.integers(2, 4))).tolist())
            for q in range(200)]
    path = tmp_path / "se.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(path)
    tok = gpt2_style_tokenizer()
    train, train_stats = load_tokenised_pairs(cfg, "train", tok)
    evals, eval_stats = load_tokenised_pairs(cfg, "eval", tok)
    test_rows = reference_split(len(rows), "test")
    n_pairs = lambda qs: sum(len(rows[q]["answers"]) * (len(rows[q]["answers"]) - 1) // 2  # noqa
                             for q in qs)
    assert len(evals) == n_pairs(test_rows) > 0
    assert len(train) == n_pairs(reference_split(len(rows), "train"))
    assert eval_stats["eval_pairs_in_train"] == 0 and eval_stats["eval_prompts_in_train"] == 0
    assert train_stats["split"]["holdout"] is None  # the paper's split, not carved by prompt
    raw = load_raw_pairs(cfg, "test", BadRows("error"))
    assert list(dict.fromkeys(p.row for p in raw)) == test_rows.tolist()  # in the paper's order
    assert all(f"list {p.row}?" in p.prompt for p in raw)


def test_bad_rows_name_the_field(tmp_path):
    good = _row(0, [1, 2])
    bad_score = _row(1, [1, 2])
    bad_score["answers"][1]["pm_score"] = "high"
    no_answers = {k: v for k, v in _row(2, [1]).items() if k != "answers"}
    path = tmp_path / "se.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (good, bad_score, no_answers)))
    with pytest.raises(DataError, match=r"answers\[1\]\.pm_score") as info:
        load_raw_pairs(_cfg(path), "other", BadRows("error"))  # another split: rows as they are
    assert "row 1" in str(info.value) and str(path) in str(info.value)
    bad = BadRows("skip")
    pairs = load_raw_pairs(_cfg(path), "other", bad)
    assert len(pairs) == 1 and sum(bad.counts.values()) == 2
    with pytest.raises(DataError, match="weight_field"):
        load_raw_pairs(_cfg(path, weight_field="pm_score"), "other", BadRows("error"))
