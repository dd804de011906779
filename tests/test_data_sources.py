"""Schema parsers on fixtures written here (jsonl, jsonl.gz, json, parquet, save_to_disk),
bad-input errors/skips, and the real HH file when present."""

import json

import pytest

from dpo_jax.data import DataError, build_pipeline
from dpo_jax.data.errors import BadRows
from dpo_jax.data.io import read_rows
from dpo_jax.data.loading import load_raw_pairs, load_tokenised_pairs
from dpo_jax.data.sources import split_prompt_and_responses
from dpo_jax.data.testing import find_shared_data, gpt2_style_tokenizer, llama3_style_tokenizer
from tests import helpers

HH_ROWS = [
    {"chosen": "\n\nHuman: hi\n\nAssistant: hello there\n\nHuman: how are you?\n\nAssistant: I am fine.",
     "rejected": "\n\nHuman: hi\n\nAssistant: hello there\n\nHuman: how are you?\n\nAssistant: Go away."},
    {"chosen": "\n\nHuman: capital of France?\n\nAssistant: Paris.",
     "rejected": "\n\nHuman: capital of France?\n\nAssistant: London."},
]


_write_jsonl = helpers.write_jsonl


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def _cfg(source, path, **kw):
    return helpers.data_config(**{"source": source, "path": str(path), "tokenizer": "unused",
                                  **kw})


def _parse(source, path, split="train", **kw):
    return load_raw_pairs(_cfg(source, path, **kw), split, BadRows(kw.get("on_bad_row", "error")))


def test_hh_split_matches_paper(tmp_path):
    pairs = _parse("hh", _write_jsonl(tmp_path / "train.jsonl.gz", HH_ROWS, gz=True))
    assert pairs[0].prompt.endswith("how are you?\n\nAssistant:")
    assert pairs[0].chosen == " I am fine." and pairs[0].rejected == " Go away."
    single = _parse("hh", tmp_path / "train.jsonl.gz", hh_single_turn=True)
    assert len(single) == 1 and single[0].chosen == " Paris."


def test_hh_prompt_mismatch_names_row(tmp_path):
    rows = HH_ROWS + [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: x\n\nAssistant: y"}]
    path = _write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError, match=r"train.jsonl: row 2: field 'rejected'"):
        _parse("hh", path)
    with pytest.raises(DataError):
        split_prompt_and_responses("no assistant turn", "x")


def test_shp_filters_ratio_and_caps_per_post(tmp_path):
    rows = [{"post_id": "p", "history": "Why?", "human_ref_A": f"A{i}", "human_ref_B": f"B{i}",
             "labels": i % 2, "score_ratio": 3.0 if i else 1.5} for i in range(8)]
    pairs = _parse("shp", _write_parquet(tmp_path / "train.parquet", rows),
                   shp_max_pairs_per_post=5)
    assert len(pairs) == 5  # row 0 has ratio 1.5 < 2; 7 left, capped at 5
    assert pairs[0].prompt == "\n\nHuman: Why?\n\nAssistant:"
    assert (pairs[0].chosen, pairs[0].rejected) == (" A1", " B1")  # labels 1: A preferred
    assert (pairs[1].chosen, pairs[1].rejected) == (" B2", " A2")


def test_tldr_prompt_format(tmp_path):
    row = {"info": {"post": "my post", "title": "t", "subreddit": "tifu"},
           "summaries": [{"text": " first "}, {"text": "second"}], "choice": 1}
    bad = {"info": {"article": "cnn", "title": "t"}, "summaries": [{"text": "a"}, {"text": "b"}],
           "choice": 0}
    path = _write_jsonl(tmp_path / "validation.jsonl", [row, bad])
    pairs = _parse("tldr", path, on_bad_row="skip")
    assert pairs[0].prompt == "SUBREDDIT: r/tifu\nTITLE: t\nPOST: my post\nTL;DR:"
    assert (pairs[0].chosen, pairs[0].rejected) == (" second", " first")
    assert len(pairs) == 1


def test_ultrafeedback_save_to_disk(tmp_path):
    import datasets

    def conv(answer):
        return [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": answer}]

    rows = {"prompt": ["Say hi"], "chosen": [conv("Hello!")], "rejected": [conv("No.")]}
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_dict(rows),
                          "test_prefs": datasets.Dataset.from_dict(rows)}).save_to_disk(
        str(tmp_path / "uf"))
    pairs = _parse("ultrafeedback", tmp_path / "uf", split="test_prefs")
    assert pairs[0].prompt == [{"role": "user", "content": "Say hi"}]
    assert (pairs[0].chosen, pairs[0].rejected) == ("Hello!", "No.")


def test_generic_strings_and_messages(tmp_path):
    rows = [{"prompt": "Q: 2+2? A:", "chosen": " 4", "rejected": " 5"}]
    assert _parse("generic", _write_parquet(tmp_path / "a.parquet", rows))[0].chosen == " 4"
    (tmp_path / "b.json").write_text(json.dumps(rows))
    assert _parse("generic", tmp_path / "b.json")[0].prompt == "Q: 2+2? A:"
    msgs = [{"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
             "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no"}]}]
    p = _parse("generic", _write_jsonl(tmp_path / "c.jsonl", msgs))[0]
    assert p.is_chat and p.prompt == [{"role": "user", "content": "hi"}] and p.chosen == "yo"


def test_directory_split_selection(tmp_path):
    _write_jsonl(tmp_path / "train-00000-of-00002.jsonl", HH_ROWS[:1])
    _write_jsonl(tmp_path / "train-00001-of-00002.jsonl", HH_ROWS[1:])
    _write_jsonl(tmp_path / "harmless-base-test.jsonl", HH_ROWS[:1])
    assert len(list(read_rows(str(tmp_path), "train"))) == 2
    assert len(list(read_rows(str(tmp_path), "test"))) == 1
    with pytest.raises(DataError, match="no data files"):
        list(read_rows(str(tmp_path), "validation"))


@pytest.mark.parametrize("rows,reason,field", [
    ([{"prompt": "p", "chosen": "a"}], "missing_field", "rejected"),
    ([{"prompt": "p", "chosen": 3, "rejected": "b"}], "bad_type", "chosen"),
    ([{"prompt": "p", "chosen": "  ", "rejected": " b"}], "empty_response", "chosen"),
    ([{"prompt": "p", "chosen": " same", "rejected": " same"}], "identical_responses",
     "rejected"),
])
def test_bad_rows_error_or_skip(tmp_path, rows, reason, field):
    """Rows that do not parse, and pairs whose tokens cannot teach a preference, name file,
    row and field; 'skip' counts them by reason."""
    good = [{"prompt": "p", "chosen": " x", "rejected": " y"}]
    path = _write_jsonl(tmp_path / "train.jsonl", good + rows)
    cfg = _cfg("generic", path, eval_fraction=0.0)
    with pytest.raises(DataError) as e:
        load_tokenised_pairs(cfg, "train", gpt2_style_tokenizer())
    assert e.value.row == 1 and e.value.field == field and e.value.reason == reason
    assert "train.jsonl" in str(e.value) and "row 1" in str(e.value)
    cfg.on_bad_row = "skip"
    pairs, stats = load_tokenised_pairs(cfg, "train", gpt2_style_tokenizer())
    assert len(pairs) == 1 and stats["bad_rows_skipped"] == {reason: 1}


def test_unreadable_files(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\nnot json\n')
    with pytest.raises(DataError, match="line 2"):
        _parse("generic", tmp_path / "train.jsonl")
    (tmp_path / "x.parquet").write_bytes(b"garbage")
    with pytest.raises(DataError, match="x.parquet"):
        _parse("generic", tmp_path / "x.parquet")
    with pytest.raises(DataError, match="no such"):
        _parse("generic", tmp_path / "missing.jsonl")


def test_prompt_too_long_error_mode(tmp_path):
    rows = [{"prompt": "word " * 50 + str(i), "chosen": " a", "rejected": " b"}
            for i in range(4)]
    path = _write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = _cfg("generic", path, max_length=24, max_prompt_length=16, truncation_mode="error",
               eval_split="", eval_size=1)
    with pytest.raises(DataError, match="row 0.*'prompt'.*max_prompt_length"):
        build_pipeline(cfg, split="train", global_batch_size=1, tokenizer=gpt2_style_tokenizer())
    cfg.on_bad_row = "skip"
    rows2 = [{"prompt": f"hi {i}", "chosen": " a", "rejected": " b"} for i in range(4)]
    rows2 += rows[:1]
    cfg.path = _write_jsonl(tmp_path / "train2.jsonl", rows2)
    p = build_pipeline(cfg, split="train", global_batch_size=1, tokenizer=gpt2_style_tokenizer())
    assert p.stats["bad_rows_skipped"] == {"prompt_too_long": 1} and len(p.pairs) == 3


def test_generic_pipeline_end_to_end(tmp_path):
    rows = [{"prompt": f"Question {i}: hello? ", "chosen": f"Yes {i}.", "rejected": "No."}
            for i in range(10)]
    path = _write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = _cfg("generic", path, eval_split="", eval_size=3)
    tok = llama3_style_tokenizer()
    tr = build_pipeline(cfg, split="train", global_batch_size=2, tokenizer=tok)
    ev = build_pipeline(cfg, split="eval", global_batch_size=2, tokenizer=tok)
    assert len(tr.pairs) == 7 and len(ev.pairs) == 3 and ev.num_batches == 2
    chosen = lambda p: tuple(p["chosen"])  # noqa: E731
    assert not {chosen(p) for p in tr.pairs} & {chosen(p) for p in ev.pairs}
    b = next(tr)
    assert b["input_ids"].shape[0] == 4 and (b["input_ids"][:, 0] == tok.bos_token_id).all()
    assert (b["loss_mask"] * (b["segment_ids"] == 0)).sum() == 0


def test_real_hh_file_parses():
    root = find_shared_data(__file__)
    if root is None or not (root / "hh_rlhf" / "harmless-base-test.jsonl.gz").exists():
        pytest.skip("shared HH data absent")
    path = root / "hh_rlhf" / "harmless-base-test.jsonl.gz"
    bad = BadRows("skip")
    pairs = load_raw_pairs(_cfg("hh", path), "test", bad)
    assert len(pairs) + bad.total == 2312 and len(pairs) > 2200
    assert all(p.prompt.endswith("\n\nAssistant:") for p in pairs)
    tok_dir = root / "gpt2_tokenizer"
    if tok_dir.is_dir():
        cfg = _cfg("hh", path, tokenizer=str(tok_dir), train_split="test", eval_split="",
                   eval_size=64, on_bad_row="skip", max_pairs=400)
        p = build_pipeline(cfg, split="train", global_batch_size=8)
        b = next(p)
        assert b["input_ids"].shape[1] <= 512 + 15
        assert p.stats["lengths"]["total"]["max"] <= 512
        assert len(p.buckets) <= 5 and p.stats["tokenisation"]["prompt_truncated"] > 0
