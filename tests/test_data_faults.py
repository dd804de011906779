"""Data faults users of DPO trainers report: checks on the tokens as finally scored, data that
cannot fit the model, and eval pairs that are training pairs."""

import logging

import numpy as np
import pytest

from dpo_jax.data import DataError, default_data_config
from dpo_jax.data.batching import materialise, pair_lengths, plan_packed, plan_unpacked
from dpo_jax.data.batching import packed_row_choices, seq_lengths_of, sequences
from dpo_jax.data.checks import check_fits_model, check_scored_pair, scored_tokens
from dpo_jax.data.errors import BadRows
from dpo_jax.data.loading import load_tokenised_pairs
from dpo_jax.data.sources import RawPair
from dpo_jax.data.testing import (chatml_tokenizer, gpt2_style_tokenizer,
                                  llama2_style_tokenizer, llama3_style_tokenizer)
from dpo_jax.data.tokenize import PairTokenizer
from tests import helpers

TOKENIZERS = {"gpt2": gpt2_style_tokenizer, "llama3": llama3_style_tokenizer,
              "llama2": llama2_style_tokenizer, "chatml": chatml_tokenizer}


def _cfg(**kw):
    return helpers.data_config(source="generic", tokenizer="unused", **kw)


def _encode(tok, pairs, on_bad_row="error", **kw):
    bad = BadRows(on_bad_row)
    return PairTokenizer(tok, _cfg(**kw))(pairs, bad), bad


def _scored_by_batch(pairs):
    """Per sequence slot, the tokens ``loss_mask`` marks, unpacked and packed."""
    seqs = sequences(pairs)
    lengths = seq_lengths_of(pair_lengths(pairs))
    out = []
    for plan in (plan_unpacked(lengths, [int(lengths.max())]),
                 plan_packed(lengths, int(lengths.max()) * 2, packed_row_choices(len(seqs), 1))):
        b = materialise(plan, dict(enumerate(seqs)), 0, plan.rows, 0)
        slot = b.get("seq_index")
        got = []
        for s in range(len(seqs)):
            where = (slot == s) if slot is not None else (
                (np.arange(plan.rows)[:, None] == s) & (b["loss_mask"] > 0))
            got.append(b["input_ids"][where & (b["loss_mask"] > 0)])
        out.append(got)
    return out


# --------------------------------------------------------------------- what is scored

@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_scored_tokens_is_the_batch_rule(name):
    """``checks.scored_tokens`` names exactly the tokens ``loss_mask`` scores, packed or not."""
    raw = [RawPair("Q: hi\nA:", " yes", " no"), RawPair("", "Hello there!", "Go away."),
           RawPair("The movie was", " great", " boring and bad")]
    pairs, _ = _encode(TOKENIZERS[name](), raw, on_bad_row="skip")
    assert pairs
    for got in _scored_by_batch(pairs):
        for s, (tokens, n_prompt) in enumerate(sequences(pairs)):
            assert np.array_equal(got[s], scored_tokens(n_prompt, tokens[n_prompt:]))


def test_empty_prompt_without_bos_is_reported():
    """The issue's case: GPT-2, prompt '', 'Yes' vs 'No': only the EOS would be scored."""
    toks = [gpt2_style_tokenizer(), helpers.shared_gpt2_tokenizer(required=False)]
    toks = [t for t in toks if t is not None]
    for tok in toks:
        pair = RawPair("", "Yes", "No", file="d.jsonl", row=0)
        with pytest.raises(DataError, match=r"d.jsonl: row 0: field 'prompt'.*never scored"):
            _encode(tok, [pair])
        pairs, bad = _encode(tok, [pair, RawPair("Q:", " Yes", " No")], on_bad_row="skip")
        assert len(pairs) == 1 and bad.counts == {"unscored_first_token": 1}
        ctx = _encode(tok, [RawPair(tok.eos_token, "Yes", "No")])[0][0]  # a context token
        assert list(ctx["prompt"]) == [tok.eos_token_id]
        assert tok.decode(list(ctx["chosen"][:-1])) == "Yes"  # all of it scored


@pytest.mark.parametrize("name", ["llama3", "llama2"])
def test_empty_prompt_with_bos_scores_the_first_response_token(name):
    tok = TOKENIZERS[name]()
    p = _encode(tok, [RawPair("", "Yes", "No")])[0][0]
    assert list(p["prompt"]) == [tok.bos_token_id]
    for got in _scored_by_batch([p]):
        assert np.array_equal(got[0], p["chosen"]) and np.array_equal(got[1], p["rejected"])


@pytest.mark.parametrize("max_length,max_prompt_length,mode", [
    (8, 4, "keep_end"), (8, 4, "keep_start"), (10, 6, "keep_end"), (12, 2, "keep_start")])
@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_responses_identical_after_truncation_are_reported(name, max_length,
                                                           max_prompt_length, mode):
    """Responses that differ only after the truncation point teach nothing: reported after
    truncation, and every pair kept has different, non-empty scored responses."""
    tok = TOKENIZERS[name]()
    same = " a b c d e f g h i j k l m n o p"
    raw = [RawPair("Q: " + "w " * 20 + "?\nA:", same + " yes", same + " no", "t.jsonl", 0),
           RawPair("Q:", " yes", " no", "t.jsonl", 1),
           RawPair("Hi", " a b", " b a", "t.jsonl", 2)]
    kw = dict(max_length=max_length, max_prompt_length=max_prompt_length, truncation_mode=mode)
    with pytest.raises(DataError, match="row 0: field 'rejected'.*scored tokens") as e:
        _encode(tok, raw, **kw)
    assert e.value.reason == "identical_responses"
    pairs, bad = _encode(tok, raw, on_bad_row="skip", **kw)
    assert bad.counts["identical_responses"] >= 1 and pairs
    for p in pairs:
        assert len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) <= max_length
        c, r = (scored_tokens(len(p["prompt"]), p[k]) for k in ("chosen", "rejected"))
        assert len(c) and len(r) and not np.array_equal(c, r)
    long = _encode(tok, raw[:1], max_length=512, max_prompt_length=256)[0]
    assert len(long) == 1  # the same row with room to differ is kept


@pytest.mark.parametrize("chosen,rejected,reason,field", [
    ("", " no", "empty_response", "chosen"),
    (" yes", "  \n ", "empty_response", "rejected"),
    (" same", " same", "identical_responses", "rejected"),
    (" same<|endoftext|>", " same", "identical_responses", "rejected"),
    (" yes<|endoftext|> more", " no", "end_token_inside", "chosen"),
])
def test_bad_rows_decided_on_tokens(chosen, rejected, reason, field):
    tok = gpt2_style_tokenizer()
    pair = RawPair("Q:", chosen, rejected, "f.jsonl", 7)
    with pytest.raises(DataError) as e:
        _encode(tok, [pair])
    assert (e.value.reason, e.value.field, e.value.row) == (reason, field, 7)
    pairs, bad = _encode(tok, [pair, RawPair("Q:", " a", " b")], on_bad_row="skip")
    assert len(pairs) == 1 and bad.counts == {reason: 1}


def test_check_scored_pair_on_arrays():
    ok = {"prompt": np.array([5, 6]), "chosen": np.array([7, 0]), "rejected": np.array([8, 0])}
    check_scored_pair(ok, end_ids={0})
    cases = [({"prompt": np.array([], np.int32)}, "unscored_first_token"),
             ({"chosen": np.array([], np.int32)}, "no_scored_tokens"),
             ({"chosen": np.array([0])}, "empty_response"),
             ({"chosen": np.array([7, 0, 9, 0])}, "end_token_inside"),
             ({"rejected": np.array([7, 0])}, "identical_responses"),
             ({"chosen": np.array([7, 9]), "rejected": np.array([7, 9])}, "identical_responses")]
    for change, reason in cases:
        with pytest.raises(DataError) as e:
            check_scored_pair({**ok, **change}, end_ids={0})
        assert e.value.reason == reason
    check_scored_pair({**ok, "chosen": np.array([7, 9])}, end_ids={0})  # truncated: no EOS


# --------------------------------------------------------------------- data vs model

def _pairs(*rows):
    return [{k: np.asarray(v, np.int32) for k, v in zip(("prompt", "chosen", "rejected"), r)}
            for r in rows]


@pytest.mark.parametrize("name", ["gpt2_local", "gpt2_real"])
def test_added_chat_tokens_outside_the_embedding_table(name):
    """The issue's case: a GPT-2 tokenizer with two added chat tokens (ids V, V+1; 50257 and
    50258 for the real one) and a model with the base vocabulary V."""
    tok = helpers.shared_gpt2_tokenizer() if name == "gpt2_real" else gpt2_style_tokenizer()
    base = len(tok)
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    pairs, _ = _encode(tok, [RawPair("<|user|> hi <|assistant|>", " yes", " no")])
    assert int(pairs[0]["prompt"].max()) == base + 1
    with pytest.raises(DataError, match="model.overrides.vocab_size.*data.tokenizer") as e:
        check_fits_model(pairs, vocab_size=base, max_positions=None, pad_id=tok.eos_token_id,
                         where="train split")
    assert e.value.reason == "token_id_out_of_range" and f"id {base}" in str(e.value)
    check_fits_model(pairs, vocab_size=base + 2, max_positions=None, pad_id=tok.eos_token_id,
                     where="train split")
    with pytest.raises(DataError, match="tokenizer has") as e:  # even when the data has none
        check_fits_model(_pairs(([1, 2], [3, 0], [4, 0])), vocab_size=base, max_positions=None,
                         pad_id=0, where="eval split", tokenizer_size=len(tok))
    assert e.value.reason == "tokenizer_larger_than_model"


@pytest.mark.parametrize("vocab_size", [16, 50257, 128256])
def test_token_ids_outside_any_vocabulary(vocab_size):
    fits = _pairs(([1, vocab_size - 1], [2, 0], [3, 0]))
    check_fits_model(fits, vocab_size=vocab_size, max_positions=None, pad_id=0, where="x")
    for bad, field in ((([1, vocab_size], [2, 0], [3, 0]), "prompt"),
                       (([1], [2, 0], [vocab_size + 7, 0]), "rejected"),
                       (([1], [-100, 0], [3, 0]), "chosen")):
        with pytest.raises(DataError, match=f"pair 1 field '{field}'") as e:
            check_fits_model(fits + _pairs(bad), vocab_size=vocab_size, max_positions=None,
                             pad_id=0, where="x")
        assert e.value.reason == "token_id_out_of_range"


@pytest.mark.parametrize("max_positions", [8, 64, 1024])
def test_sequences_longer_than_the_position_table(max_positions):
    fits = _pairs(([1] * (max_positions - 3), [2, 2, 0], [3, 0]))  # exactly max_positions
    check_fits_model(fits, vocab_size=8, max_positions=max_positions, pad_id=0, where="x")
    check_fits_model(fits + _pairs(([1] * max_positions, [2, 0], [3, 0])), vocab_size=8,
                     max_positions=None, pad_id=0, where="x")  # rotary: no table
    with pytest.raises(DataError, match=r"pair 1 is .* set data.max_length <= ") as e:
        check_fits_model(fits + _pairs(([1] * max_positions, [2, 0], [3, 0])), vocab_size=8,
                         max_positions=max_positions, pad_id=0, where="x")
    assert e.value.reason == "sequence_too_long" and "model.overrides.max_len" in str(e.value)


def test_pad_id_outside_the_vocabulary():
    pairs = _pairs(([1], [2, 0], [3, 0]))
    for pad in (-1, 8, 50256):
        with pytest.raises(DataError, match="pad id") as e:
            check_fits_model(pairs, vocab_size=8, max_positions=None, pad_id=pad, where="x")
        assert e.value.reason == "pad_id_out_of_range"


def test_synthetic_data_against_small_models():
    cfg = default_data_config()
    pairs, _ = load_tokenised_pairs(cfg, "eval")
    check_fits_model(pairs, vocab_size=cfg.synthetic.vocab_size, max_positions=64, pad_id=0,
                     where="synthetic eval")
    with pytest.raises(DataError, match="data.synthetic.vocab_size"):
        check_fits_model(pairs, vocab_size=cfg.synthetic.vocab_size // 2, max_positions=64,
                         pad_id=0, where="synthetic eval")
    with pytest.raises(DataError, match="position table has 16"):
        check_fits_model(pairs, vocab_size=cfg.synthetic.vocab_size, max_positions=16,
                         pad_id=0, where="synthetic eval")


# --------------------------------------------------------------------- eval vs train

_write = helpers.write_jsonl


def _rows(n_prompts, per_prompt, start=0):
    return [{"prompt": f"Question {i}:", "chosen": f" yes {j}", "rejected": f" no {j}"}
            for i in range(start, start + n_prompts) for j in range(per_prompt)]


def _load(cfg, split):
    return load_tokenised_pairs(cfg, split, gpt2_style_tokenizer())


def _prompts(pairs):
    return {p["prompt"].tobytes() for p in pairs}


@pytest.mark.parametrize("n_prompts,per_prompt,fraction", [(40, 1, 0.1), (30, 3, 0.1),
                                                           (10, 4, 0.25)])
def test_one_file_holds_out_prompts_by_default(tmp_path, caplog, n_prompts, per_prompt,
                                               fraction):
    """The issue's case: one jsonl, default settings: eval is a held-out set of prompts."""
    path = _write(tmp_path / "pairs.jsonl", _rows(n_prompts, per_prompt))
    cfg = _cfg(path=path, eval_fraction=fraction)
    with caplog.at_level(logging.INFO, logger="dpo_jax.data"):
        train, train_stats = _load(cfg, "train")
        evals, eval_stats = _load(cfg, "eval")
    held = max(1, round(fraction * n_prompts))
    assert len(evals) == held * per_prompt and len(train) == (n_prompts - held) * per_prompt
    assert not _prompts(train) & _prompts(evals)
    assert eval_stats["eval_pairs_in_train"] == 0 and eval_stats["eval_prompts_in_train"] == 0
    holdout = eval_stats["split"]["holdout"]
    assert holdout == train_stats["split"]["holdout"]
    note = holdout.pop("note")
    assert holdout == {
        "by": "eval_fraction", "eval_prompts": held, "prompts": n_prompts,
        "eval_pairs": held * per_prompt, "train_pairs": (n_prompts - held) * per_prompt}
    assert "eval holds out" in caplog.text and "shares" not in caplog.text
    # a decision the user did not ask for (eval_split 'test' on one file): a warning per split
    # naming the counts and the field that turns it off, and the same line in the data stats
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2 and all(note in w for w in warned)
    assert (f"eval holds out {held} of {n_prompts} prompts" in note
            and f"train keeps {(n_prompts - held) * per_prompt} pairs" in note
            and "data.eval_fraction=0" in note)
    again, _ = _load(cfg, "eval")  # deterministic
    assert [p["prompt"].tobytes() for p in again] == [p["prompt"].tobytes() for p in evals]
    other, _ = _load(_cfg(path=path, eval_fraction=fraction, shuffle_seed=1), "eval")
    assert len(other) == len(evals)


def test_explicit_holdout_is_reported_without_a_warning(tmp_path, caplog):
    """data.eval_split='' asks for the carve: an INFO line, no warning, the note in the stats."""
    path = _write(tmp_path / "pairs.jsonl", _rows(20, 2))
    with caplog.at_level(logging.INFO, logger="dpo_jax.data"):
        _, stats = _load(_cfg(path=path, eval_split="", eval_fraction=0.1), "train")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert stats["split"]["holdout"]["note"] == (
        f"eval holds out 2 of 20 prompts of {path} (4 pairs, by eval_fraction); train keeps "
        "36 pairs")


@pytest.mark.parametrize("suffix", ["jsonl", "parquet"])
def test_evaluating_on_training_pairs_is_explicit_and_reported(tmp_path, caplog, suffix):
    rows = _rows(12, 2)
    if suffix == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = str(tmp_path / "pairs.parquet")
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        path = _write(tmp_path / "pairs.jsonl", rows)
    cfg = _cfg(path=path, eval_fraction=0.0)
    with caplog.at_level(logging.WARNING, logger="dpo_jax.data"):
        evals, stats = _load(cfg, "eval")
    assert len(evals) == 24 and stats["eval_pairs_in_train"] == 24
    assert stats["eval_prompts_in_train"] == 12 and stats["split"]["holdout"] is None
    assert "eval shares 24 of its 24 pairs" in caplog.text


def test_carving_by_eval_size_takes_whole_prompts(tmp_path):
    path = _write(tmp_path / "pairs.jsonl", _rows(10, 3))
    for eval_split in ("", "test"):  # explicit carving, and one file serving both splits
        cfg = _cfg(path=path, eval_split=eval_split, eval_size=5)
        train, _ = _load(cfg, "train")
        evals, stats = _load(cfg, "eval")
        assert len(evals) == 6 and len(train) == 24  # 2 prompts reach 5 pairs
        assert not _prompts(train) & _prompts(evals) and stats["eval_pairs_in_train"] == 0


def test_separate_split_files_are_not_carved_and_duplicates_are_counted(tmp_path, caplog):
    _write(tmp_path / "train.jsonl", _rows(8, 2))
    _write(tmp_path / "test.jsonl", _rows(2, 2) + _rows(3, 1, start=100))
    cfg = _cfg(path=str(tmp_path))
    train, _ = _load(cfg, "train")
    with caplog.at_level(logging.WARNING, logger="dpo_jax.data"):
        evals, stats = _load(cfg, "eval")
    assert len(train) == 16 and len(evals) == 7 and stats["split"]["holdout"] is None
    assert stats["eval_pairs_in_train"] == 4 and stats["eval_prompts_in_train"] == 2
    assert "eval shares 4 of its 7 pairs" in caplog.text


def test_save_to_disk_dataset_without_splits_is_carved(tmp_path):
    import datasets

    rows = _rows(20, 1)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    cfg = _cfg(path=str(tmp_path / "ds"))
    train, _ = _load(cfg, "train")
    evals, stats = _load(cfg, "eval")
    assert len(evals) == 2 and len(train) == 18 and stats["eval_pairs_in_train"] == 0


def test_one_prompt_cannot_be_split(tmp_path):
    path = _write(tmp_path / "pairs.jsonl", _rows(1, 5))
    with pytest.raises(DataError, match="data.eval_fraction=0") as e:
        _load(_cfg(path=path), "eval")
    assert e.value.reason == "no_train_prompts"
    evals, stats = _load(_cfg(path=path, eval_fraction=0.0), "eval")  # explicit, reported
    assert stats["eval_pairs_in_train"] == 5


def test_synthetic_eval_overlap(caplog):
    cfg = default_data_config()
    cfg.synthetic.num_train, cfg.synthetic.num_eval = 256, 64
    _, stats = load_tokenised_pairs(cfg, "eval")
    assert stats["eval_pairs_in_train"] == 0
    cfg.synthetic.eval_seed = cfg.synthetic.train_seed
    with caplog.at_level(logging.WARNING, logger="dpo_jax.data"):
        _, stats = load_tokenised_pairs(cfg, "eval")
    assert stats["eval_pairs_in_train"] == 64 and "eval shares 64" in caplog.text
