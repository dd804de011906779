"""The sampler's prompt is the training prompt: a prompt file's text (or messages) gives the
tokens a training pair with that prompt gets (BOS, moved trailing whitespace, template,
truncation), through the pair tokenizer's one prompt path; a response that repeats the
template's assistant header after a prompt that ends with it is a bad row. Tokenizers are built
here (no hub)."""

import types

import pytest

from dpo_jax.data import DataError, load_tokenised_pairs
from dpo_jax.data.errors import BadRows
from dpo_jax.data.prompts import load_prompts
from dpo_jax.data.sources import RawPair
from dpo_jax.data.testing import (chatml_tokenizer, gpt2_style_tokenizer,
                                  llama2_style_tokenizer, llama3_style_tokenizer)
from tests import helpers

BUILDERS = {"llama3": llama3_style_tokenizer, "llama2": llama2_style_tokenizer,
            "gpt2": gpt2_style_tokenizer, "chatml": chatml_tokenizer}
TEXT_PROMPTS = ["SUBREDDIT: r/tifu\nPOST: my friend is late\nTL;DR: ",
                "Question: how warm is it today?\nAnswer:", "The film was  ", "Why?\n",
                "Human: hi there\n\nAssistant: ", "Hello there!\n\n"]
MESSAGES = [{"role": "user", "content": "Name a city in Portugal."}]


@pytest.fixture(scope="module", params=list(BUILDERS))
def tok(request):
    return BUILDERS[request.param]()


def _cfg(tmp_path, tok, **fields):
    tok.save_pretrained(tmp_path / "tok")
    return helpers.data_config(**{"source": "generic", "path": str(tmp_path / "data"),
                                  "tokenizer": str(tmp_path / "tok"), "eval_fraction": 0.0,
                                  **fields})


def _train_prompts(path, cfg):
    """The training prompts of the prompt file ``path`` under data block ``cfg``."""
    return load_prompts("train", prompt_file=path, eval_prompt_file="", max_prompts=0,
                        data_cfg=cfg)


def _turn(prompt, text):
    """A response as a pairs file holds it: text, or an assistant message after messages."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def _files(tmp_path, prompts, chosen="fine, thank you.", rejected="it was terrible."):
    (tmp_path / "data").mkdir()
    helpers.write_jsonl(tmp_path / "data" / "train.jsonl",
                        [{"prompt": p, "chosen": _turn(p, chosen), "rejected": _turn(p, rejected)}
                         for p in prompts])
    return helpers.write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])


def test_prompt_file_tokens_are_the_training_prompts(tok, tmp_path):
    """Text prompts with trailing spaces / newlines (and messages, with a template): the
    prompt-file tokens equal the training pairs' prompt tokens; BOS once exactly when the
    tokenizer adds one; what is left out is trailing whitespace only. The old path
    (``tok.encode`` without special tokens) differs for every tokenizer here."""
    prompts = TEXT_PROMPTS + ([MESSAGES] if tok.chat_template else [])
    path = _files(tmp_path, prompts)
    cfg = _cfg(tmp_path, tok)
    pairs, _ = load_tokenised_pairs(cfg, "train")
    assert len(pairs) == len(prompts)
    got = _train_prompts(path, cfg)
    assert [list(p) for p in got] == [list(p["prompt"]) for p in pairs]
    bos = tok.bos_token_id if tok("")["input_ids"][:1] == [tok.bos_token_id] else None
    differs = 0
    for text, ids in zip(prompts, got):
        ids = list(ids)
        assert (ids[0] == bos and ids.count(bos) == 1) if bos is not None else bos not in ids
        if isinstance(text, str):
            shown = tok.decode(ids, skip_special_tokens=True)
            assert text.startswith(shown.lstrip(" ")) or text.startswith(shown)
            assert text[len(shown):].strip() == "" or text[len(shown) - 1:].strip() == ""
            differs += ids != tok(text, add_special_tokens=False)["input_ids"]
    assert differs >= 1


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_long_prompts_are_cut_as_training_prompts(mode, tmp_path):
    """A prompt over max_prompt_length: the prompt file's tokens are the training pair's prompt
    as truncation cut it (its BOS kept); 'error' truncation refuses the row by file, row and
    field."""
    tok = llama3_style_tokenizer()
    long = "Human: " + "a b c d e f g h i j k l m n o p " * 6 + "\n\nAssistant: "
    path = _files(tmp_path, ["Hi there! ", long], chosen="fine, thank you. " * 4)
    cfg = _cfg(tmp_path, tok, max_prompt_length=16, max_length=40, truncation_mode=mode)
    pairs, stats = load_tokenised_pairs(cfg, "train")
    assert stats["tokenisation"]["prompt_truncated"] == 1
    got = _train_prompts(path, cfg)
    assert [list(p) for p in got] == [list(p["prompt"]) for p in pairs]
    assert len(got[1]) == 16 and got[1][0] == tok.bos_token_id
    cfg.truncation_mode = "error"
    with pytest.raises(DataError, match=r"prompts.jsonl: row 1: field 'prompt'") as e:
        _train_prompts(path, cfg)
    assert e.value.reason == "prompt_too_long"


def test_prompt_file_bad_rows_are_named_or_skipped(tmp_path):
    tok = gpt2_style_tokenizer()
    path = helpers.write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi! "}, {"text": "x"},
                                                      {"prompt_ids": [5, 6]}])
    cfg = _cfg(tmp_path, tok)
    with pytest.raises(DataError, match=r"p.jsonl: row 1: field 'prompt'"):
        _train_prompts(path, cfg)
    cfg.on_bad_row = "skip"
    got = _train_prompts(path, cfg)
    assert [list(p) for p in got] == [tok("Hi!")["input_ids"], [5, 6]]


_enc = helpers.pair_tokenizer


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_a_doubled_assistant_header_is_a_bad_row(name, tmp_path):
    """The template's assistant header at the start of a response whose prompt already ends
    with it (messages rendered with the generation prompt, or a pre-rendered text prompt), in
    chosen, rejected or a list's response: refused naming file, row and field, or counted when
    skipped. A text prompt that ends before the header may carry it in the response."""
    tok = BUILDERS[name]()
    enc = _enc(tok)
    header = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)[
        len(tok.apply_chat_template(MESSAGES, tokenize=False)):]
    assert header.strip() and "assistant" in header
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    end = tok.convert_ids_to_tokens(enc.turn_end)
    cases = [(MESSAGES, header + "Lisbon.", "Oslo.", "chosen"),
             (MESSAGES, "Porto.", "\n" + header + "Oslo.", "rejected"),
             (rendered, header + "Lisbon." + end, "Oslo." + end, "chosen")]
    for prompt, chosen, rejected, field in cases:
        pair = RawPair(prompt, chosen, rejected, file="pairs.jsonl", row=4)
        with pytest.raises(DataError, match=rf"pairs.jsonl: row 4: field '{field}'") as e:
            enc([pair], BadRows("error"))
        assert e.value.reason == "doubled_assistant_header"
    bad = BadRows("skip")
    kept = enc([RawPair(*c[:3]) for c in cases] + [RawPair(MESSAGES, "Lisbon.", "Oslo.")], bad)
    assert len(kept) == 1 and bad.counts == {"doubled_assistant_header": 3}
    # the header once, in the response: the prompt ends at the user's turn end
    before = rendered[:len(rendered) - len(header)]
    ok = enc([RawPair(before, header + "Lisbon." + end, header + "Oslo." + end)],
             BadRows("error"))[0]
    assert tok.decode(list(ok["prompt"]) + list(ok["chosen"])).count("assistant") == 1
    item = types.SimpleNamespace(prompt=MESSAGES, responses=["Lisbon.", header + "Faro."],
                                 is_chat=True, file="ranked.jsonl", row=2)
    with pytest.raises(DataError, match=r"ranked.jsonl: row 2: field 'responses\[1\]'"):
        enc.encode_lists([item], BadRows("error"))


def test_prompt_ids_rows_cut_keeping_the_end_and_edge_rows(tmp_path):
    """``prompt_ids`` rows over ``max_prompt_length`` keep their last tokens (the cut a
    too-long prompt gets at sample time, written out here); a text prompt of exactly
    ``max_prompt_length`` tokens is kept whole even under 'error' truncation; an empty text
    prompt (no BOS: gpt2-style) is a bad row naming file, row and field, or dropped."""
    tok = gpt2_style_tokenizer()
    exact = tok("a b c d e f g h", add_special_tokens=False)["input_ids"]
    assert len(exact) == 8
    path = helpers.write_jsonl(tmp_path / "p.jsonl", [
        {"prompt_ids": list(range(1, 30))}, {"prompt": "a b c d e f g h"}, {"prompt": ""}])
    cfg = _cfg(tmp_path, tok, max_prompt_length=8, truncation_mode="error")
    with pytest.raises(DataError, match=r"p.jsonl: row 2: field 'prompt'") as e:
        _train_prompts(path, cfg)
    assert e.value.reason == "empty_prompt"
    cfg.on_bad_row = "skip"
    got = _train_prompts(path, cfg)
    assert [list(p) for p in got] == [list(range(22, 30)), exact]
