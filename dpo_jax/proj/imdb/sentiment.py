"""Offline sentiment reward for the IMDb experiment: hashed n-gram TF-IDF + logistic regression.

The paper (Section 6.1) uses a pre-trained sentiment classifier as the *ground-truth* reward of a
generated review. No hub download is allowed here, so this module trains its own classifier on
the IMDb train labels: unigram+bigram features hashed into ``2**20`` buckets (no vocabulary to
store, any text can be scored), sublinear TF-IDF, L2-normalised rows, and an L2-regularised
logistic regression fitted full-batch with optax in JAX (a sparse ``segment_sum`` matvec).
Reaches ~90% on the full IMDb test split in well under a minute on two CPU cores (see
``experiments/imdb/README.md`` for the measured number).

**Reward = the positive-sentiment logit** ``log p(pos|x) - log p(neg|x)`` of the whole text
(prompt + completion). The logit, not the probability, because the probability saturates at 0/1
for strongly worded reviews, which flattens differences between good completions; the logit is a
monotone transform, so pair preferences (which completion wins) are identical either way, and
:meth:`SentimentReward.probability` gives ``sigmoid(logit)`` when a bounded reward is wanted.
:class:`HubSentimentReward` computes the same quantity from a transformers classifier
(``siebert/sentiment-roberta-large-english``, as in the paper's code) for hosts with the hub.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import time
import zlib
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from dpo_jax.proj.imdb.text import clean_review
from dpo_jax.proj.imdb.text import load_imdb

FORMAT_VERSION = 1
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[!?]")
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@runtime_checkable
class RewardFn(Protocol):
    """A ground-truth reward over (prompt, completion) pairs; higher is more positive."""

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray: ...


class _TextScorer:
    """A :class:`RewardFn` from ``self.score(texts)``: the reward of ``prompt + completion``."""

    def __call__(self, prompts: Sequence[str], completions: Sequence[str]) -> np.ndarray:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        return self.score([p + c for p, c in zip(prompts, completions)])


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads crc32 values over 64 bits so ``% n_features`` is uniform."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x & _MASK64


def hashed_ngrams(texts: Sequence[str], n_features: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Hashed unigram+bigram occurrences of ``texts`` as ``(doc_index, feature_index)`` arrays.

    Only the regex split and one dict lookup per token run in Python; each distinct word is
    crc32-hashed once (stable across processes, unlike ``hash``), and the bigram hashes, the
    bucket indices and the document indices are numpy array arithmetic.
    """
    vocab: dict[str, int] = {}
    ids: list[int] = []
    lengths = np.zeros(len(texts), np.int64)
    for i, text in enumerate(texts):
        toks = _TOKEN.findall(clean_review(text).lower())
        lengths[i] = len(toks)
        ids.extend([vocab.setdefault(w, len(vocab)) for w in toks])
    word_hash = np.fromiter(
        (zlib.crc32(w.encode("utf-8")) for w in vocab), np.uint64, count=len(vocab)
    )
    tok = _mix64(word_hash)[np.asarray(ids, np.int64)] if ids else np.zeros(0, np.uint64)
    doc = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)
    same_doc = doc[1:] == doc[:-1]
    with np.errstate(over="ignore"):
        bigram = _mix64(tok[:-1] * np.uint64(0x9E3779B97F4A7C15) ^ tok[1:])[same_doc]
    feats = np.concatenate([tok, bigram]) % np.uint64(n_features)
    docs = np.concatenate([doc, doc[:-1][same_doc]])
    return docs, feats.astype(np.int64), len(texts)


def count_matrix(
    texts: Sequence[str], n_features: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Sparse counts ``(doc, feature, count)`` sorted by doc, one entry per distinct feature."""
    docs, feats, n = hashed_ngrams(texts, n_features)
    keys, counts = np.unique(docs * n_features + feats, return_counts=True)
    return keys // n_features, keys % n_features, counts.astype(np.float32), n


def tfidf_values(
    doc: np.ndarray, feat: np.ndarray, counts: np.ndarray, idf: np.ndarray, n_docs: int
) -> np.ndarray:
    """Sublinear TF-IDF values, L2-normalised per document.

    Normalising makes a 10-token completion and a 500-token review comparable, which matters
    because the reward scores short generations with a model fitted on full reviews.
    """
    values = (1.0 + np.log(counts)) * idf[feat]
    norms = np.sqrt(np.bincount(doc, weights=values * values, minlength=n_docs))
    return (values / np.maximum(norms[doc], 1e-12)).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------


class SentimentReward(_TextScorer):
    """A fitted linear sentiment classifier over hashed n-gram TF-IDF features.

    Callable as a :class:`RewardFn`: the reward of a completion is the positive logit of the
    full review ``prompt + completion`` (the prompt is the review's first tokens, the
    classifier judges the review as a whole, as in the paper).
    """

    def __init__(self, weights: np.ndarray, bias: float, idf: np.ndarray, meta: dict | None = None):
        if weights.shape != idf.shape or weights.ndim != 1:
            raise ValueError(f"weights {weights.shape} and idf {idf.shape} must be equal 1-D")
        self.weights = np.asarray(weights, np.float32)
        self.bias = float(bias)
        self.idf = np.asarray(idf, np.float32)
        self.meta = dict(meta or {})

    @property
    def n_features(self) -> int:
        return int(self.weights.shape[0])

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Positive-sentiment logits ``log p(pos)/p(neg)``, float32 [len(texts)]."""
        texts = list(texts)
        if not texts:
            return np.zeros(0, np.float32)
        doc, feat, counts, n = count_matrix(texts, self.n_features)
        values = tfidf_values(doc, feat, counts, self.idf, n)
        z = np.bincount(doc, weights=values * self.weights[feat], minlength=n)
        return (z + self.bias).astype(np.float32)

    def probability(self, texts: Sequence[str]) -> np.ndarray:
        """``p(positive | text)`` = sigmoid of :meth:`score`."""
        return (1.0 / (1.0 + np.exp(-self.score(texts).astype(np.float64)))).astype(np.float32)

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        """Hard labels, 1 positive / 0 negative."""
        return (self.score(texts) > 0).astype(np.int64)

    def accuracy(self, texts: Sequence[str], labels: np.ndarray) -> float:
        return float(np.mean(self.predict(texts) == np.asarray(labels)))


    # ---- persistence: npz arrays + json metadata (no pickle, loadable anywhere) -----------

    def save(self, path: str | pathlib.Path) -> pathlib.Path:
        """Write ``path/sentiment.npz`` and ``path/sentiment.json``; returns ``path``."""
        path = pathlib.Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.savez(path / "sentiment.npz", weights=self.weights, idf=self.idf,
                 bias=np.float32(self.bias))
        meta = {"format_version": FORMAT_VERSION, "kind": "hashed_ngram_tfidf_logreg",
                "n_features": self.n_features, "ngrams": [1, 2],
                "token_pattern": _TOKEN.pattern, **self.meta}
        (path / "sentiment.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | pathlib.Path) -> "SentimentReward":
        path = pathlib.Path(path)
        meta = json.loads((path / "sentiment.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {meta.get('format_version')} unsupported")
        if meta.get("token_pattern") != _TOKEN.pattern:
            raise ValueError(f"{path}: saved with a different tokenizer pattern")
        with np.load(path / "sentiment.npz", allow_pickle=False) as z:
            return cls(z["weights"], float(z["bias"]), z["idf"], meta)


def train_sentiment(
    train_texts: Sequence[str],
    train_labels: np.ndarray,
    *,
    n_features: int = 2**20,
    l2: float = 1e-6,
    steps: int = 300,
    learning_rate: float = 0.2,
    verbose: bool = False,
) -> SentimentReward:
    """Fit the classifier; labels are 1 positive / 0 negative (``unsup`` rows must be dropped).

    Full-batch Adam on the mean logistic loss + ``l2 * ||w||^2``: the data (~15M non-zeros for
    the full train split) fits in memory, so there is no minibatch noise to tune, and one jitted
    step is a gather + ``segment_sum``. The defaults were chosen on a 90/10 split of *train*
    (never on test); see ``experiments/imdb/README.md``.
    """
    import jax
    import jax.numpy as jnp
    import optax

    labels = np.asarray(train_labels)
    if labels.shape != (len(train_texts),) or not np.isin(labels, (0, 1)).all():
        raise ValueError("train_labels must be 0/1 with one label per text")
    t0 = time.perf_counter()
    doc, feat, counts, n = count_matrix(train_texts, n_features)
    df = np.bincount(feat, minlength=n_features)
    idf = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)
    values = tfidf_values(doc, feat, counts, idf, n)
    if verbose:
        print(f"features: {n} docs, {len(values):,} non-zeros, {time.perf_counter() - t0:.1f}s")

    doc_j, feat_j = jnp.asarray(doc, jnp.int32), jnp.asarray(feat, jnp.int32)
    val_j, y_j = jnp.asarray(values), jnp.asarray(labels, jnp.float32)

    def loss_fn(params):
        z = jax.ops.segment_sum(params["w"][feat_j] * val_j, doc_j, num_segments=n,
                                indices_are_sorted=True) + params["b"]
        return optax.sigmoid_binary_cross_entropy(z, y_j).mean() + l2 * jnp.sum(params["w"] ** 2)

    opt = optax.adam(learning_rate)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = {"w": jnp.zeros(n_features, jnp.float32), "b": jnp.zeros((), jnp.float32)}
    opt_state = opt.init(params)
    for i in range(steps):
        params, opt_state, loss = step(params, opt_state)
        if verbose and (i % 50 == 0 or i == steps - 1):
            print(f"step {i:4d} loss {float(loss):.4f}")
    meta = {"l2": l2, "steps": steps, "learning_rate": learning_rate, "train_docs": n,
            "train_seconds": round(time.perf_counter() - t0, 1)}
    return SentimentReward(np.asarray(params["w"]), float(params["b"]), idf, meta)


class HubSentimentReward(_TextScorer):
    """A transformers sentiment classifier as the reward (the paper's setup, needs the hub).

    Returns the same quantity as :class:`SentimentReward`: ``logit_pos - logit_neg`` (the raw
    logits, ``function_to_apply="none"``), computed on ``prompt + completion``. The pipeline is
    built on first use so that importing this module never imports transformers/torch.
    """

    def __init__(self, name: str = "siebert/sentiment-roberta-large-english", *,
                 device: int | str = -1, batch_size: int = 32, positive_label: str = "POSITIVE",
                 negative_label: str = "NEGATIVE"):
        self.name, self.device, self.batch_size = name, device, batch_size
        self.positive_label, self.negative_label = positive_label, negative_label
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            from transformers import pipeline

            self._pipe = pipeline("sentiment-analysis", model=self.name, device=self.device)
        return self._pipe

    def score(self, texts: Sequence[str]) -> np.ndarray:
        outs = self._pipeline()(list(texts), top_k=None, function_to_apply="none",
                                truncation=True, batch_size=self.batch_size)
        rewards = []
        for out in outs:
            logits = {d["label"].upper(): d["score"] for d in out}
            rewards.append(logits[self.positive_label] - logits[self.negative_label])
        return np.asarray(rewards, np.float32)



def main(argv: Sequence[str] | None = None) -> dict:
    """Train on IMDb train, evaluate on the full test split, save to ``--out``."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="directory with {train,test}-*.parquet")
    ap.add_argument("--out", required=True, help="output directory for the fitted reward")
    ap.add_argument("--n_features", type=int, default=2**20)
    ap.add_argument("--l2", type=float, default=1e-6)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--learning_rate", type=float, default=0.2)
    ap.add_argument("--limit", type=int, default=None, help="use the first N rows of each split")
    ap.add_argument("--val_fraction", type=float, default=0.0,
                    help="hold out this much of train and report it (hyperparameter choice)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    texts, labels = load_imdb(args.data, "train", limit=args.limit)
    n_val = int(round(args.val_fraction * len(texts)))
    fit_texts, fit_labels = texts[n_val:], labels[n_val:]
    model = train_sentiment(fit_texts, fit_labels, n_features=args.n_features, l2=args.l2,
                            steps=args.steps, learning_rate=args.learning_rate, verbose=True)
    result = {"train_accuracy": model.accuracy(fit_texts, fit_labels)}
    if n_val:
        result["val_accuracy"] = model.accuracy(texts[:n_val], labels[:n_val])
    test_texts, test_labels = load_imdb(args.data, "test", limit=args.limit)
    result["test_accuracy"] = model.accuracy(test_texts, test_labels)
    result["test_docs"] = len(test_texts)
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    model.meta.update(result)
    model.save(args.out)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
