"""The offline sentiment reward: features, training, scoring, save/load, and real-data accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dpo_jax.proj.imdb import sentiment
from dpo_jax.proj.imdb.sentiment import HubSentimentReward, RewardFn, SentimentReward
from tests._imdb_common import imdb_data, synthetic_reviews


@pytest.fixture(scope="module")
def small_model() -> SentimentReward:
    texts, labels = synthetic_reviews(400, seed=0)
    return sentiment.train_sentiment(texts, labels, n_features=2**14, steps=100)


def test_hashing_is_deterministic_and_in_range():
    texts = ["A great film!", "not good at all", ""]
    d1, f1, n = sentiment.hashed_ngrams(texts, 1000)
    d2, f2, _ = sentiment.hashed_ngrams(texts, 1000)
    assert n == 3 and np.array_equal(d1, d2) and np.array_equal(f1, f2)
    assert f1.min() >= 0 and f1.max() < 1000
    # "a great film !" -> 4 unigrams + 3 bigrams; "not good at all" -> 4 + 3; "" -> 0
    assert np.bincount(d1, minlength=3).tolist() == [7, 7, 0]


def test_bigrams_do_not_cross_documents():
    d, f, _ = sentiment.hashed_ngrams(["good", "bad"], 2**20)
    assert len(f) == 2  # two unigrams, no "good bad" bigram


def test_br_tags_are_ignored():
    a = sentiment.hashed_ngrams(["good movie<br /><br />bad acting"], 2**20)[1]
    b = sentiment.hashed_ngrams(["good movie bad acting"], 2**20)[1]
    assert np.array_equal(np.sort(a), np.sort(b))


def test_trained_model_separates_synthetic_sentiment(small_model):
    texts, labels = synthetic_reviews(200, seed=1)
    assert small_model.accuracy(texts, labels) > 0.95
    s = small_model.score(["wonderful brilliant superb", "awful terrible boring", ""])
    assert s[0] > 0 > s[1]
    assert np.isclose(s[2], small_model.bias)  # no features -> the bias alone
    p = small_model.probability(["wonderful brilliant superb"])
    assert np.isclose(p[0], 1 / (1 + np.exp(-s[0])), atol=1e-6)


def test_reward_fn_scores_prompt_plus_completion(small_model):
    assert isinstance(small_model, RewardFn)
    r = small_model(["The movie was", "The movie was"], [" wonderful and fun", " awful and dull"])
    assert r.shape == (2,) and r.dtype == np.float32 and r[0] > r[1]
    assert np.allclose(r, small_model.score(["The movie was wonderful and fun",
                                             "The movie was awful and dull"]))
    with pytest.raises(ValueError):
        small_model(["a"], ["b", "c"])
    assert small_model.score([]).shape == (0,)


def test_save_load_roundtrip_without_pickle(small_model, tmp_path):
    small_model.save(tmp_path)
    meta = json.loads((tmp_path / "sentiment.json").read_text())
    assert meta["n_features"] == 2**14 and meta["format_version"] == sentiment.FORMAT_VERSION
    loaded = SentimentReward.load(tmp_path)
    texts, _ = synthetic_reviews(50, seed=2)
    assert np.array_equal(loaded.score(texts), small_model.score(texts))
    with np.load(tmp_path / "sentiment.npz", allow_pickle=False) as z:
        assert set(z.files) == {"weights", "idf", "bias"}


def test_train_rejects_unsup_labels():
    with pytest.raises(ValueError):
        sentiment.train_sentiment(["a", "b"], np.array([1, -1]), n_features=64, steps=1)


def test_hub_reward_is_lazy():
    hub = HubSentimentReward("siebert/sentiment-roberta-large-english")
    assert isinstance(hub, RewardFn) and hub._pipe is None  # nothing imported or downloaded


@pytest.mark.imdb_data
def test_real_imdb_subsample_accuracy():
    """4k train / 2k test reviews: well above chance (the full-data number is in the README)."""
    from dpo_jax.proj.imdb.text import load_imdb

    data = imdb_data()
    train_x, train_y = load_imdb(data, "train", limit=4000)
    test_x, test_y = load_imdb(data, "test", limit=2000)
    model = sentiment.train_sentiment(train_x, train_y, n_features=2**18, steps=150)
    acc = model.accuracy(test_x, test_y)
    assert acc > 0.84, acc
