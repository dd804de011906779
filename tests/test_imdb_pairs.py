"""Review prefixes of 2-8 tokens and all strict-preference pairs among completions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from dpo_jax.proj.imdb import pairs
from tests._imdb_common import synthetic_reviews


class WordTokenizer:
    """A whitespace tokenizer: token i is the i-th word followed by a space."""

    def __init__(self):
        self.vocab: dict[str, int] = {}
        self.inv: list[str] = []

    def encode(self, text, add_special_tokens=False):
        ids = []
        for w in text.split(" "):
            if w not in self.vocab:
                self.vocab[w] = len(self.inv)
                self.inv.append(w)
            ids.append(self.vocab[w])
        return ids

    def decode(self, ids):
        return " ".join(self.inv[i] for i in ids)


def test_prefix_lengths_and_content():
    texts, _ = synthetic_reviews(300, seed=0)
    tok = WordTokenizer()
    out = pairs.make_prefixes(texts, tok, min_tokens=2, max_tokens=8, seed=0)
    assert len(out) == 300
    lengths = [len(p.token_ids) for p in out]
    assert min(lengths) == 2 and max(lengths) == 8 and len(set(lengths)) == 7
    for p in out:
        assert "<br" not in p.text
        from dpo_jax.proj.imdb.text import clean_review

        assert clean_review(texts[p.source_index]).startswith(p.text)
    again = pairs.make_prefixes(texts, tok, seed=0)
    assert [p.text for p in again] == [p.text for p in out]
    assert [p.text for p in pairs.make_prefixes(texts, tok, seed=1)] != [p.text for p in out]


def test_short_reviews_are_capped_or_skipped():
    tok = WordTokenizer()
    out = pairs.make_prefixes(["one", "two words", "a b c"], tok, min_tokens=2, max_tokens=8)
    assert [p.source_index for p in out] == [1, 2]
    assert [p.text for p in out] == ["two words", "a b c"]
    with pytest.raises(ValueError):
        pairs.make_prefixes(["x"], tok, min_tokens=5, max_tokens=2)


def test_prefixes_with_a_real_bpe(tmp_path):
    from dpo_jax.proj.imdb.tokenizer import save_tokenizer, train_bpe

    texts, _ = synthetic_reviews(200, seed=1)
    hf = save_tokenizer(train_bpe(texts, vocab_size=300), tmp_path)
    for p in pairs.make_prefixes(texts, hf, seed=0):
        assert 2 <= len(p.token_ids) <= 8
        assert hf.encode(p.text, add_special_tokens=False) == list(p.token_ids)


def test_four_distinct_rewards_give_six_ordered_pairs():
    rows = pairs.build_pairs("P", ["a", "b", "c", "d"], [0.5, 2.0, -1.0, 1.0])
    assert len(rows) == 6
    assert [(r["chosen"], r["rejected"]) for r in rows] == [
        ("b", "d"), ("b", "a"), ("b", "c"), ("d", "a"), ("d", "c"), ("a", "c")]
    for r in rows:
        assert r["chosen_reward"] > r["rejected_reward"] and r["prompt"] == "P"
        assert set(r) == set(pairs.PAIR_COLUMNS)


def test_ties_are_dropped():
    rows = pairs.build_pairs("P", ["a", "b", "c", "d"], [1.0, 1.0, 0.0, 0.0])
    assert sorted((r["chosen"], r["rejected"]) for r in rows) == [
        ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d")]
    assert pairs.build_pairs("P", ["a", "b"], [3.0, 3.0]) == []


def test_pairs_match_brute_force_on_random_rewards():
    rng = np.random.default_rng(0)
    for _ in range(50):
        r = rng.integers(0, 4, size=4).astype(float)  # many ties
        rows = pairs.build_pairs("P", list("abcd"), r)
        expect = {(i, j) for i, j in itertools.permutations(range(4), 2) if r[i] > r[j]}
        assert {("abcd".index(x["chosen"]), "abcd".index(x["rejected"])) for x in rows} == expect
        assert len(rows) == len(expect)


def test_bad_rewards_raise():
    with pytest.raises(ValueError):
        pairs.build_pairs("P", ["a", "b"], [1.0])
    with pytest.raises(ValueError):
        pairs.build_pairs("P", ["a", "b"], [1.0, float("nan")])


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_write_read_roundtrip(tmp_path, suffix):
    rows = pairs.build_pair_dataset(
        ["It was", "Ünïcode"], [["x", "y", "z", "w"], ["q", "r", "s", "t"]],
        [[1, 2, 3, 4], [0.1, 0.1, 0.2, -5]])
    assert len(rows) == 6 + 5
    path = pairs.write_pairs(rows, tmp_path / f"pairs{suffix}")
    assert pairs.read_pairs(path) == rows
    with pytest.raises(ValueError):
        pairs.write_pairs(rows, tmp_path / "pairs.csv")
