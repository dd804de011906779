"""Shared helpers for the IMDb tests: synthetic reviews and the real-data location."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from dpo_jax.data.testing import DATA_ENV, data_root

IMDB_DATA = data_root() / "imdb"

_POS = ["great", "wonderful", "loved", "brilliant", "excellent", "superb", "moving", "fun"]
_NEG = ["awful", "boring", "terrible", "waste", "worst", "dull", "hated", "bad"]
_NEUTRAL = ["the", "movie", "film", "plot", "actor", "scene", "story", "was", "and", "it",
            "this", "a", "of", "director", "ending", "music"]


def synthetic_reviews(n: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Short reviews whose label decides which sentiment words appear (with <br /> tags)."""
    rng = np.random.default_rng(seed)
    texts, labels = [], rng.integers(0, 2, size=n)
    for y in labels:
        words = list(rng.choice(_NEUTRAL, size=int(rng.integers(6, 14))))
        pool = _POS if y == 1 else _NEG
        for _ in range(int(rng.integers(1, 4))):
            words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(pool)))
        texts.append(" ".join(words[:5]) + "<br /><br />" + " ".join(words[5:]) + ".")
    return texts, labels.astype(np.int64)


def imdb_data() -> pathlib.Path:
    """The real IMDb parquet directory, or skip the test."""
    if not any(IMDB_DATA.glob("train-*.parquet")):
        pytest.skip(f"no IMDb data under {IMDB_DATA} (set ${DATA_ENV} to the data root "
                    "holding imdb/)")
    return IMDB_DATA


def write_shards(root: pathlib.Path) -> None:
    """``root/{train,test,unsup}-00000-of-00001.parquet`` of synthetic reviews (48 / 24 / 16;
    unsup labelled -1), the layout ``imdb.data_dir`` reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir()
    for split, n, seed in (("train", 48, 0), ("test", 24, 1), ("unsup", 16, 2)):
        texts, labels = synthetic_reviews(n, seed)
        if split == "unsup":
            labels = np.full(n, -1)
        pq.write_table(pa.table({"text": texts, "label": labels.astype(np.int64)}),
                       root / f"{split}-00000-of-00001.parquet")
