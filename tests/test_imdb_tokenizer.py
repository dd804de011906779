"""The IMDb byte-level BPE: trains on cleaned text, saves as an AutoTokenizer directory."""

from __future__ import annotations

import json

import pytest

from dpo_jax.data.tokenize import load_tokenizer
from dpo_jax.proj.imdb import tokenizer as imdb_tok
from tests._imdb_common import synthetic_reviews


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    texts, _ = synthetic_reviews(300, seed=0)
    from dpo_jax.proj.imdb.text import clean_review

    out = tmp_path_factory.mktemp("tok")
    tok = imdb_tok.train_bpe([clean_review(t) for t in texts], vocab_size=400)
    imdb_tok.save_tokenizer(tok, out)
    return out


def test_autotokenizer_loads_with_eos_bos_pad(tok_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    assert len(hf) <= 400
    assert hf.eos_token == hf.bos_token == hf.pad_token == imdb_tok.EOS
    assert hf.eos_token_id == hf.pad_token_id == 0
    assert hf.convert_ids_to_tokens(0) == imdb_tok.EOS


def test_byte_level_roundtrip_of_unseen_text(tok_dir):
    hf = load_tokenizer(str(tok_dir))
    for s in ["the movie was wonderful", " Unseen wörds, ünïcode & emoji 🎬!", "  two  spaces"]:
        ids = hf.encode(s, add_special_tokens=False)
        assert hf.decode(ids) == s
    # merges were learnt: a frequent word is one or two tokens, not one per byte
    assert len(hf.encode(" movie", add_special_tokens=False)) <= 2


def test_eos_is_a_single_special_token(tok_dir):
    hf = load_tokenizer(str(tok_dir))
    assert hf.encode("good" + imdb_tok.EOS, add_special_tokens=False)[-1] == hf.eos_token_id


def test_build_cli_on_small_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts, labels = synthetic_reviews(200, seed=3)
    data = tmp_path / "imdb"
    data.mkdir()
    for split in ("train", "unsup"):
        pq.write_table(pa.table({"text": texts, "label": labels}),
                       data / f"{split}-00000-of-00001.parquet")
    summary = imdb_tok.main([f"--data={data}", f"--out={tmp_path / 'tok'}", "--vocab_size=350"])
    assert summary["reviews"] == 400 and summary["vocab_size"] <= 350
    assert json.loads((tmp_path / "tok" / "build_summary.json").read_text()) == summary
    hf = load_tokenizer(str(tmp_path / "tok"))
    # trained on cleaned text: no merges were learnt across "<br />", so it stays many tokens
    assert len(hf.encode("<br />", add_special_tokens=False)) >= 4
