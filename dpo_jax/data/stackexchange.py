"""The ``se`` source: StackExchange preferences (``HuggingFaceH4/stack-exchange-preferences``)
read as the DPO paper's code reads them (``preference_datasets.get_se``).

* **split**: the dataset has one split, ``train``; the paper's code shuffles its rows with seed
  42 (``datasets.Dataset.shuffle``: ``np.random.default_rng(42).permutation``) and takes the
  first ``int(0.01 n)`` as ``test``, the rest as ``train``. ``data.train_split='train'`` /
  ``data.eval_split='test'`` (the defaults) give exactly those rows, in that order; another
  split name reads that split of the dataset as it is.
* **HTML**: question and answers are cleaned by :func:`strip_html_tags` (the paper's code):
  the top-level ``<p>`` (their direct text only), ``<pre>`` (each ``<code>`` inside) and
  ``<code>`` elements, code kept as ``<code>...</code>``, joined by blank lines; everything else
  is dropped.
* **pairs**: prompt ``"\\n\\nHuman: " + question + "\\n\\nAssistant:"``, responses ``" " +
  answer``; every two answers ``i < j`` form one pair, ``i`` preferred when its ``pm_score``
  is higher, else ``j`` (equal scores included, ``j`` preferred, as the paper's code does).
  Rows with the same question keep the last row's pairs at the first row's place (the paper's
  code keys its data by prompt).

The paper's code truncates SE prompts with ``keep_start``; set ``data.truncation_mode`` to
match it. Rows that do not parse raise ``DataError`` naming the row and field (``question``,
``answers``, ``answers[i].text``, ``answers[i].pm_score``).
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from dpo_jax.data.errors import BadRows, DataError
from dpo_jax.data.io import Row, read_rows
from dpo_jax.data.sources import RawPair

HUB_NAME = "HuggingFaceH4/stack-exchange-preferences"
SHUFFLE_SEED = 42  # the paper's code: dataset.shuffle(seed=42)
TEST_FRACTION = 0.01  # the paper's code: the first 1% of the shuffled rows are the test split
REFERENCE_SPLITS = ("train", "test")
_HUMAN, _ASSISTANT = "\n\nHuman: ", "\n\nAssistant:"


def strip_html_tags(html: str) -> str:
    """StackExchange HTML -> text as the paper's code cleans it (``strip_html_tags``): the
    direct text of each top-level ``<p>``, each ``<code>`` of a top-level ``<pre>`` and each
    top-level ``<code>`` (as ``<code>...</code>``), joined by ``"\\n\\n"``."""
    from bs4 import BeautifulSoup, NavigableString

    soup = BeautifulSoup(html, "html.parser")
    text = []
    for element in soup.children:
        if isinstance(element, NavigableString):
            continue
        if element.name == "p":
            text.append("".join(child.string for child in element.children
                                if isinstance(child, NavigableString)))
        elif element.name == "pre":
            for code in element.find_all("code"):
                text.append("<code>" + code.get_text() + "</code>")
        elif element.name == "code":
            text.append("<code>" + element.get_text() + "</code>")
    return "\n\n".join(text)


def reference_split(n: int, split: str) -> np.ndarray:
    """Row indices of the paper's ``split`` ('train' or 'test') of an ``n``-row dataset, in the
    order its code reads them."""
    order = np.random.default_rng(SHUFFLE_SEED).permutation(n)
    k = int(n * TEST_FRACTION)
    return order[:k] if split == "test" else order[k:]


def se_pairs(rec: dict[str, Any], file: str, row: int) -> tuple[str, list[tuple[str, str]]]:
    """``(prompt, [(chosen, rejected), ...])`` of one row (module doc). Raises ``DataError``
    naming the field."""
    question = rec.get("question")
    if not isinstance(question, str):
        raise DataError(f"expected the question's HTML as a string, got {type(question).__name__}"
                        f" (row has {sorted(rec)})", file=file, row=row, field="question",
                        reason="missing_field" if question is None else "bad_type")
    answers = rec.get("answers")
    if not isinstance(answers, list):
        raise DataError(f"expected a list of answers, got {type(answers).__name__}", file=file,
                        row=row, field="answers",
                        reason="missing_field" if answers is None else "bad_type")
    responses, scores = [], []
    for i, a in enumerate(answers):
        text = a.get("text") if isinstance(a, dict) else None
        score = a.get("pm_score") if isinstance(a, dict) else None
        if not isinstance(text, str):
            raise DataError("expected the answer's HTML as a string", file=file, row=row,
                            field=f"answers[{i}].text", reason="bad_type")
        if isinstance(score, bool) or not isinstance(score, (int, float, np.number)):
            raise DataError(f"expected a number, got {score!r}", file=file, row=row,
                            field=f"answers[{i}].pm_score", reason="bad_type")
        responses.append(" " + strip_html_tags(text))
        scores.append(score)
    pairs = []
    for i in range(len(responses)):
        for j in range(i + 1, len(responses)):
            w, l = (i, j) if scores[i] > scores[j] else (j, i)
            pairs.append((responses[w], responses[l]))
    return _HUMAN + strip_html_tags(question) + _ASSISTANT, pairs


def _rows_of(path: str, split: str, hub_config: str) -> Iterable[Row]:
    """The rows the paper's ``split`` reads: its share of the dataset's ``train`` rows, in its
    order (two passes: count, then keep); another split name: that split as it is."""
    if split not in REFERENCE_SPLITS:
        yield from read_rows(path, split, hub_config)
        return
    n = sum(1 for _ in read_rows(path, "train", hub_config))
    rank = {int(i): r for r, i in enumerate(reference_split(n, split))}
    kept: list[tuple[int, Row]] = [(rank[i], r) for i, r in enumerate(
        read_rows(path, "train", hub_config)) if i in rank]
    for _, r in sorted(kept, key=lambda x: x[0]):
        yield r


def load_se_pairs(cfg, split: str, bad: BadRows) -> list:
    """Raw pairs of dataset split ``split`` of ``cfg.path`` (the hub dataset when empty), as
    the module doc says."""
    if getattr(cfg, "weight_field", ""):
        raise DataError("the se source forms several pairs per row and has no per-pair weight "
                        "column: set data.weight_field=''", file=cfg.path or HUB_NAME,
                        field="weight_field", reason="bad_config")
    by_prompt: dict[str, list] = {}
    for file, row, rec in _rows_of(cfg.path or HUB_NAME, split, cfg.hub_config):
        try:
            prompt, pairs = se_pairs(rec, file, row)
        except DataError as e:
            bad.handle(e)
            continue
        by_prompt[prompt] = [RawPair(prompt, c, r, file, row) for c, r in pairs]
    return [p for pairs in by_prompt.values() for p in pairs]
