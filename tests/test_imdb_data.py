"""Where the IMDb reviews come from: the hub dataset by default (here a local dataset laid out
as the hub repository), a parquet shard directory or a save_to_disk directory overriding it,
and one clear message when there is neither data nor network."""

import pathlib

import numpy as np
import pytest

from dpo_jax.proj.imdb import text
from dpo_jax.proj.imdb.text import clean_review, load_imdb
from tests import helpers
from tests._imdb_common import synthetic_reviews

SIZES = {"train": 40, "test": 20, "unsupervised": 12}


def _splits():
    """The hub's splits as they are ordered there: by label (negatives first)."""
    out = {}
    for i, (split, n) in enumerate(SIZES.items()):
        texts, labels = synthetic_reviews(n, seed=i)
        if split == "unsupervised":
            labels = np.full(n, -1)
        order = np.argsort(labels, kind="stable")
        out[split] = ([texts[j] for j in order], labels[order].astype(np.int64))
    return out


def _hub_layout(root: pathlib.Path) -> pathlib.Path:
    """A directory shaped like the stanfordnlp/imdb hub repository (README configs +
    plain_text/<split>-00000-of-00001.parquet)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (root / "plain_text").mkdir(parents=True)
    for split, (texts, labels) in _splits().items():
        pq.write_table(pa.table({"text": texts, "label": labels}),
                       root / "plain_text" / f"{split}-00000-of-00001.parquet")
    files = "".join(f"  - split: {s}\n    path: plain_text/{s}-*\n" for s in SIZES)
    (root / "README.md").write_text(
        f"---\nconfigs:\n- config_name: plain_text\n  data_files:\n{files}  default: true\n---\n")
    return root


def test_hub_default_reads_the_dataset_through_datasets(tmp_path, monkeypatch):
    monkeypatch.setattr(text, "HUB_DATASET", str(_hub_layout(tmp_path / "hub")))
    want = _splits()
    for split, hub_split in (("train", "train"), ("test", "test"), ("unsup", "unsupervised")):
        texts, labels = load_imdb("", split)
        src_texts, src_labels = want[hub_split]
        assert len(texts) == len(src_texts)
        # every review once, cleaned, with its own label
        assert sorted(zip(texts, labels.tolist())) == sorted(
            zip(map(clean_review, src_texts), src_labels.tolist()))
    # the label-ordered split is read in a fixed permutation: a prefix holds both labels
    _, head = load_imdb("", "train", limit=10)
    assert set(head.tolist()) == {0, 1}
    assert load_imdb("", "train", limit=10)[0] == load_imdb("", "train")[0][:10]
    assert set(load_imdb("", "unsup")[1].tolist()) == {-1}


def test_local_directories_override_the_hub(tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(text, "HUB_DATASET", str(tmp_path / "absent"))
    splits = _splits()
    saved = tmp_path / "saved"
    datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": t, "label": y})
                          for s, (t, y) in splits.items()}).save_to_disk(str(saved))
    shards = tmp_path / "shards"
    shards.mkdir()
    for split, name in (("train", "train"), ("test", "test"), ("unsup", "unsupervised")):
        t, y = splits[name]
        pq.write_table(pa.table({"text": t, "label": y}), shards / f"{split}-00000-of-00001.parquet")
    for split, name in (("train", "train"), ("unsup", "unsupervised")):
        src_texts, src_labels = splits[name]
        from_saved, y_saved = load_imdb(saved, split)
        assert sorted(from_saved) == sorted(map(clean_review, src_texts))
        from_shards, y_shards = load_imdb(shards, split)  # shards: file order
        assert from_shards == [clean_review(t) for t in src_texts]
        np.testing.assert_array_equal(y_shards, src_labels)
    with pytest.raises(KeyError, match="'unsupervised' or 'unsup'"):
        datasets.DatasetDict({"train": datasets.Dataset.from_dict(
            {"text": ["a"], "label": [1]})}).save_to_disk(str(tmp_path / "only_train"))
        load_imdb(tmp_path / "only_train", "unsup")


def test_no_data_and_no_network_is_one_message_saying_what_to_set(tmp_path, monkeypatch):
    """The test suite runs offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE, tests/conftest.py),
    as a fresh machine without network: the default config's first stage fails saying what
    to set."""
    from dpo_jax.tasks import get_task

    monkeypatch.setattr(text, "HUB_DATASET", "dpo-jax-tests/no-such-imdb")
    module = helpers.load_module("configs/imdb.py", "imdb_config")
    config = module.get_config("tiny")
    assert config.imdb.data_dir == "" and module.get_config("cpu").imdb.data_dir == ""
    with pytest.raises(FileNotFoundError) as info:
        get_task(config.task)(config, str(tmp_path / "work"))
    message = str(info.value)
    assert "imdb.data_dir" in message and "no-such-imdb" in message and "parquet" in message
    with pytest.raises(FileNotFoundError, match="imdb.data_dir"):
        load_imdb(tmp_path / "not-there", "train")
