"""Reading and cleaning IMDb reviews.

Where the reviews come from (``imdb.data_dir`` of ``configs/imdb.py``, the ``data_dir`` argument
here):

* ``''`` (the default): the hub dataset ``stanfordnlp/imdb`` (:data:`HUB_DATASET`) through
  ``datasets`` (network or its local cache);
* a directory of parquet shards ``{train,test,unsup}-*.parquet`` (the layout of the project's
  data notes, docs/data.md);
* anything else ``datasets`` loads: a ``save_to_disk`` directory (a ``DatasetDict`` with the
  splits), a local dataset directory or script, another hub name.

The ``datasets`` forms name the unlabelled split ``unsupervised`` (``unsup`` here). The hub's
splits are ordered by label, so they are read in one fixed permutation (seed 0): a prefix of a
split is then a fair subsample with both labels, as it is of the (shuffled) local shards.

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
HUB_DATASET = "stanfordnlp/imdb"
_DATASETS_SPLITS = {"train": ("train",), "test": ("test",), "unsup": ("unsupervised", "unsup")}


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


def _no_data(source: str, split: str, error: Exception) -> FileNotFoundError:
    return FileNotFoundError(
        f"IMDb split {split!r}: cannot load {source!r} ({type(error).__name__}: "
        f"{str(error).splitlines()[0] if str(error) else ''}). With network, leave "
        f"imdb.data_dir empty to read the hub dataset {HUB_DATASET!r}; offline, set "
        f"imdb.data_dir (e.g. --config.imdb.data_dir=PATH) to a directory of "
        f"{{train,test,unsup}}-*.parquet shards or a datasets.save_to_disk directory")


def _pick_split(source: str, names, available) -> str:
    """The first of ``names`` that ``available`` holds; KeyError naming both otherwise."""
    name = next((n for n in names if n in available), None)
    if name is None:
        raise KeyError(f"IMDb {source!r} has no split {' or '.join(map(repr, names))} "
                       f"(it has {list(available)})")
    return name


def _load_datasets(source: str, split: str) -> tuple[list[str], np.ndarray]:
    """Texts and labels of ``split`` through ``datasets``: a ``save_to_disk`` directory or
    anything ``datasets.load_dataset`` reads (hub name, local dataset directory or script),
    in the fixed permutation the module doc describes. Raises ``FileNotFoundError`` saying
    what to set when it cannot be loaded, ``KeyError`` when the split or a column is missing."""
    import datasets

    path = pathlib.Path(source)
    names = _DATASETS_SPLITS[split]
    try:
        if path.is_dir() and any((path / n).exists() for n in (
                "dataset_dict.json", "state.json")):
            ds = datasets.load_from_disk(source)
        else:
            if not path.exists() and (path.is_absolute() or source.startswith((".", "~"))):
                raise FileNotFoundError("no such file or directory")
            available = datasets.get_dataset_split_names(source)
            ds = datasets.load_dataset(source, split=_pick_split(source, names, available))
    except KeyError:
        raise
    except Exception as e:  # noqa: BLE001 - offline, unknown name, unreadable: one message
        raise _no_data(source, split, e) from e
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[_pick_split(source, names, sorted(ds))]
    missing = {"text", "label"} - set(ds.column_names)
    if missing:
        raise KeyError(f"IMDb {source!r} split {split!r} lacks column(s) {sorted(missing)} "
                       f"(it has {ds.column_names})")
    order = np.random.default_rng(0).permutation(len(ds))
    texts = ds["text"]
    labels = np.asarray(ds["label"], np.int64)
    return [texts[i] for i in order], labels[order]


def load_imdb(
    data_dir: str | pathlib.Path, split: str, *, clean: bool = True, limit: int | None = None
) -> tuple[list[str], np.ndarray]:
    """Texts and int labels (1 positive, 0 negative, -1 for ``unsup``) of one split, from
    ``data_dir`` as the module doc lists ('' = the hub dataset).

    ``limit`` keeps the first rows only (a fair subsample with both labels: see the module
    doc). Raises ``FileNotFoundError`` saying what to set when the reviews cannot be read."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    source = str(data_dir) if str(data_dir) else HUB_DATASET
    if not pathlib.Path(source).is_dir() or not any(pathlib.Path(source).glob("*-*.parquet")):
        texts, label_arr = _load_datasets(source, split)
    else:
        import pyarrow.parquet as pq  # lazy: only the data-reading paths need pyarrow

        texts = []
        labels: list[np.ndarray] = []
        for path in imdb_files(source, split):
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
