"""The one jsonl(.gz) reader/writer: round trip, atomic replacement, errors naming file and row."""

import os

import pytest

from dpo_jax.data.errors import DataError
from dpo_jax.data.io import read_jsonl, write_jsonl

ROWS = [{"prompt": "é ü", "ids": [1, 2, 3]}, {"prompt": "", "ids": []}, {"nested": {"a": 1.5}}]


@pytest.mark.parametrize("name", ["rows.jsonl", "sub/dir/rows.jsonl.gz"])
def test_round_trip_and_gzip_by_suffix(tmp_path, name):
    path = tmp_path / name
    write_jsonl(iter(ROWS), path)
    assert read_jsonl(path) == ROWS
    with open(path, "rb") as f:
        assert (f.read(2) == b"\x1f\x8b") == name.endswith(".gz")
    assert os.listdir(path.parent) == [path.name]  # no temporary file left behind


def test_gzip_output_is_the_same_bytes_for_the_same_rows(tmp_path):
    write_jsonl(ROWS, tmp_path / "a.jsonl.gz")
    write_jsonl(ROWS, tmp_path / "b.jsonl.gz")
    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "b.jsonl.gz").read_bytes()


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(ROWS, path)

    def rows_then_crash():
        yield {"partial": 1}
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(rows_then_crash(), path)
    assert read_jsonl(path) == ROWS
    assert os.listdir(tmp_path) == ["rows.jsonl"]


def test_bad_lines_and_missing_files_name_file_and_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": \n')
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert e.value.file == str(path) and e.value.row == 2
    path.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert e.value.row == 1
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl")
