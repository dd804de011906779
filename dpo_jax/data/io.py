"""Reading rows from local files, ``save_to_disk`` directories or the hub; the one jsonl(.gz)
reader/writer (``read_jsonl`` / ``write_jsonl``).

All row readers yield ``(file, row_index, record)`` so any later problem can name its file and
row. Local copies are preferred (tests and offline runs); a ``path`` that exists on disk is never
sent to the hub.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import re
from typing import Any, Iterable, Iterator

from dpo_jax.data.errors import DataError

Record = dict[str, Any]
Row = tuple[str, int, Record]

_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")


def _is_data_file(p: pathlib.Path) -> bool:
    return p.is_file() and p.name.endswith(_SUFFIXES)


def _is_saved_dataset(p: pathlib.Path) -> bool:
    return p.is_dir() and any(
        (p / n).exists() for n in ("dataset_dict.json", "state.json", "dataset_info.json")
    )


def _open_text(path: pathlib.Path):
    """``path`` opened for reading UTF-8 text, through gzip when its name ends in ``.gz``."""
    return (gzip.open if path.name.endswith(".gz") else open)(path, "rt", encoding="utf-8")


def _read_json_lines(path: pathlib.Path) -> Iterator[Row]:
    try:
        with _open_text(path) as f:
            row = 0
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"invalid JSON on line {line_no}: {e}", file=str(path),
                                    row=row, reason="unreadable") from e
                if not isinstance(rec, dict):
                    raise DataError("a JSON line must be an object", file=str(path), row=row,
                                    reason="unreadable")
                yield str(path), row, rec
                row += 1
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read file: {e}", file=str(path), reason="unreadable") from e


def read_jsonl(path: str | os.PathLike) -> list[Record]:
    """The objects of a jsonl file, one per non-blank line; gzip when the name ends in ``.gz``.

    Raises ``DataError`` naming the file (and the row for a line that is not a JSON object)."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise DataError("no such file", file=str(p), reason="unreadable")
    return [rec for _, _, rec in _read_json_lines(p)]


def write_jsonl(rows: Iterable[Record], path: str | os.PathLike) -> None:
    """Write ``rows`` as jsonl (UTF-8, one object per line; gzip when the name ends in ``.gz``).

    Atomic: the rows go to a temporary file in the same directory, renamed over ``path`` only
    when complete, so a killed writer never leaves a file that looks finished. Parent
    directories are created. gzip output carries no name or timestamp (same rows, same bytes)."""
    p = pathlib.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as raw:
            gz = (gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0)
                  if p.name.endswith(".gz") else None)
            out = raw if gz is None else gz
            for r in rows:
                out.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
            if gz is not None:
                gz.close()  # writes the gzip trailer; leaves ``raw`` open
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read_json(path: pathlib.Path) -> Iterator[Row]:
    try:
        with _open_text(path) as f:
            data = json.load(f)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read JSON file: {e}", file=str(path), reason="unreadable") from e
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()) and data:
        n = len(next(iter(data.values())))  # columnar {"col": [...]}
        data = [{k: v[i] for k, v in data.items()} for i in range(n)]
    if not isinstance(data, list):
        raise DataError("a JSON file must hold a list of objects or a dict of columns",
                        file=str(path), reason="unreadable")
    for i, rec in enumerate(data):
        yield str(path), i, rec


def _read_parquet(path: pathlib.Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for corrupt files
        raise DataError(f"cannot read parquet file: {e}", file=str(path),
                        reason="unreadable") from e
    for i, rec in enumerate(table.to_pylist()):
        yield str(path), i, rec


def read_file(path: str | os.PathLike) -> Iterator[Row]:
    """Rows of one jsonl / jsonl.gz / json / json.gz / parquet file."""
    p = pathlib.Path(path)
    if not p.is_file():
        raise DataError("no such file", file=str(p), reason="unreadable")
    if p.name.endswith((".jsonl", ".jsonl.gz")):
        return _read_json_lines(p)
    if p.name.endswith((".json", ".json.gz")):
        return _read_json(p)
    if p.name.endswith(".parquet"):
        return _read_parquet(p)
    raise DataError(f"unsupported file type (want one of {_SUFFIXES})", file=str(p),
                    reason="unreadable")


def _split_matches(name: str, split: str) -> bool:
    """'train-00000-of-00003.parquet' and 'harmless-base-test.jsonl.gz' match 'train'/'test'."""
    return split in re.split(r"[-_.]", name)


def _read_saved(p: pathlib.Path, split: str) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:
        raise DataError(f"cannot load save_to_disk directory: {e}", file=str(p),
                        reason="unreadable") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"split {split!r} not in {sorted(ds)}", file=str(p),
                            reason="unreadable")
        ds = ds[split]
    for i, rec in enumerate(ds):
        yield str(p), i, rec


def _read_hub(name: str, split: str, hub_config: str) -> Iterator[Row]:
    import datasets

    kwargs: dict[str, Any] = {}
    if hub_config:
        # hh-rlhf subsets are data_dirs; most other datasets use config names.
        kwargs["data_dir" if name.lower().endswith("hh-rlhf") else "name"] = hub_config
    try:
        ds = datasets.load_dataset(name, split=split, **kwargs)
    except Exception as e:
        raise DataError(f"cannot load hub dataset {name!r} split {split!r}: {e}", file=name,
                        reason="unreadable") from e
    for i, rec in enumerate(ds):
        yield f"{name}[{split}]", i, rec


def read_rows(path: str, split: str, hub_config: str = "") -> Iterator[Row]:
    """Rows of ``split`` at ``path``.

    * a file: all its rows (the file *is* the split);
    * a ``save_to_disk`` directory: that Dataset, or the ``split`` key of a DatasetDict;
    * a directory of files: the files whose name contains ``split`` as a ``-_.`` separated word
      (sorted), or ``<dir>/<split>/`` if that is a directory;
    * anything else: a hub dataset name.
    """
    p = pathlib.Path(path)
    if p.is_file():
        yield from read_file(p)
    elif _is_saved_dataset(p):
        yield from _read_saved(p, split)
    elif p.is_dir():
        if (p / split).is_dir():
            yield from read_rows(str(p / split), split)
            return
        files = sorted(f for f in p.iterdir() if _is_data_file(f) and _split_matches(f.name, split))
        if not files:
            raise DataError(f"no data files for split {split!r} (want a name containing it and "
                            f"ending in one of {_SUFFIXES})", file=str(p), reason="unreadable")
        for f in files:
            yield from read_file(f)
    elif p.is_absolute() or path.startswith((".", "~")) or path.endswith(_SUFFIXES):
        raise DataError("no such file or directory", file=str(p), reason="unreadable")
    else:
        yield from _read_hub(path, split, hub_config)
