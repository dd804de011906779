"""Reading and cleaning IMDb reviews (the raw parquet shards under ``<data>/imdb``).

The reviews carry HTML line breaks (``<br />``). Every consumer here (sentiment features, the
BPE tokenizer, review prefixes) sees text cleaned by the same :func:`clean_review`, so a
prefix drawn for generation looks like what the tokenizer and the SFT model were trained on.
"""

from __future__ import annotations

import pathlib
import re

import numpy as np

_BR = re.compile(r"<br\s*/?>", re.IGNORECASE)
_SPACES = re.compile(r"[ \t]+")

SPLITS = ("train", "test", "unsup")


def clean_review(text: str) -> str:
    """Replace ``<br />`` tags by a space and collapse runs of spaces.

    A space (not a newline) keeps reviews single-line, which is what the generation prompts
    and the SFT data look like; the tags carry no sentiment.
    """
    return _SPACES.sub(" ", _BR.sub(" ", text)).strip()


def imdb_files(data_dir: str | pathlib.Path, split: str) -> list[pathlib.Path]:
    """The sorted parquet shards of ``split``; raises when there are none (a wrong path)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    files = sorted(pathlib.Path(data_dir).glob(f"{split}-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no {split}-*.parquet under {data_dir}")
    return files


def load_imdb(
    data_dir: str | pathlib.Path, split: str, *, clean: bool = True, limit: int | None = None
) -> tuple[list[str], np.ndarray]:
    """Texts and int labels (1 positive, 0 negative, -1 for ``unsup``) of one split.

    ``limit`` keeps the first rows only (the shards are already shuffled, so a prefix of the
    split is a fair subsample with both labels).
    """
    import pyarrow.parquet as pq  # lazy: only the data-reading paths need pyarrow

    texts: list[str] = []
    labels: list[np.ndarray] = []
    for path in imdb_files(data_dir, split):
        table = pq.read_table(path, columns=["text", "label"])
        texts.extend(table.column("text").to_pylist())
        labels.append(table.column("label").to_numpy().astype(np.int64))
        if limit is not None and len(texts) >= limit:
            break
    label_arr = np.concatenate(labels)
    if limit is not None:
        texts, label_arr = texts[:limit], label_arr[:limit]
    if clean:
        texts = [clean_review(t) for t in texts]
    return texts, label_arr
