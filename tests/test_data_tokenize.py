"""Tokenisation boundary cases: GPT-2 (real files when present, else a local look-alike),
a Llama-3-style tokenizer and chat templates, all built locally; truncation; masks."""

import numpy as np
import pytest

from dpo_jax.data import default_data_config, load_tokenizer
from dpo_jax.data.batching import materialise, plan_unpacked, sequences, seq_lengths_of, pair_lengths
from dpo_jax.data.errors import BadRows
from dpo_jax.data.sources import RawPair
from dpo_jax.data.testing import (chatml_tokenizer, find_shared_data, gpt2_style_tokenizer,
                                  llama3_style_tokenizer)
from dpo_jax.data.tokenize import PairTokenizer


def _enc(tok, **kw):
    c = default_data_config()
    for k, v in kw.items():
        setattr(c, k, v)
    return PairTokenizer(tok, c)


def _one(enc, prompt, chosen, rejected="Something else entirely."):
    return enc([RawPair(prompt, chosen, rejected)], BadRows("error"))[0]


@pytest.fixture(scope="module", params=["gpt2_real", "gpt2_local"])
def gpt2(request):
    if request.param == "gpt2_local":
        return gpt2_style_tokenizer()
    root = find_shared_data(__file__)
    if root is None or not (root / "gpt2_tokenizer").is_dir():
        pytest.skip("shared GPT-2 tokenizer absent")
    return load_tokenizer(str(root / "gpt2_tokenizer"))


BOUNDARY = [
    ("\n\nHuman: hi there\n\nAssistant:", " Hello! How are you?"),
    ("SUBREDDIT: r/tifu\nTITLE: t\nPOST: my friend\nTL;DR: ", "friend was late"),  # trailing space
    ("The movie was", " great, I loved it."),
    ("Question:\n", "\nAnswer: yes"),
]


@pytest.mark.parametrize("prompt,response", BOUNDARY)
def test_gpt2_boundary_matches_joined_text(gpt2, prompt, response):
    enc = _enc(gpt2)
    p = _one(enc, prompt, response)
    joined = gpt2(prompt + response, add_special_tokens=False)["input_ids"]
    eos = gpt2.eos_token_id
    assert list(p["prompt"]) + list(p["chosen"]) == joined + [eos]
    assert p["chosen"][-1] == eos and (p["chosen"][:-1] != eos).all()  # EOS once
    assert p["prompt"][0] != eos  # GPT-2 adds no BOS
    assert gpt2.decode(list(p["prompt"]) + list(p["chosen"][:-1])) == prompt + response


def test_keep_trailing_space_differs_from_joined(gpt2):
    prompt, resp = "TL;DR: ", "friend was late"
    p = _one(_enc(gpt2, prompt_trailing_whitespace="keep"), prompt, resp)
    joined = gpt2(prompt + resp, add_special_tokens=False)["input_ids"]
    assert list(p["prompt"]) + list(p["chosen"][:-1]) != joined  # why 'move' is the default
    assert gpt2.decode(list(p["prompt"]) + list(p["chosen"][:-1])) == prompt + resp


def test_gpt2_eos_in_text_not_doubled(gpt2):
    p = _one(_enc(gpt2), "Q:", " yes<|endoftext|>")
    assert p["chosen"][-1] == gpt2.eos_token_id and p["chosen"][-2] != gpt2.eos_token_id


def test_llama3_bos_once_and_eos_once():
    tok = llama3_style_tokenizer()
    enc = _enc(tok)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    p = _one(enc, "Human: hi\n\nAssistant:", " Hello there!")
    assert p["prompt"][0] == bos and (p["prompt"][1:] != bos).all()
    assert bos not in p["chosen"] and p["chosen"][-1] == eos and (p["chosen"][:-1] != eos).all()
    joined = tok("Human: hi\n\nAssistant: Hello there!")["input_ids"]  # with specials: BOS
    assert list(p["prompt"]) + list(p["chosen"][:-1]) == joined
    q = _one(enc, "<|begin_of_text|>Human: hi", " ok<|end_of_text|>")
    assert list(q["prompt"]).count(bos) == 1 and list(q["chosen"]).count(eos) == 1
    r = _one(enc, "<|begin_of_text|><|begin_of_text|>Human: hi", " ok")
    assert list(r["prompt"]).count(bos) == 1
    assert enc.stats.bos_already_present == 2 and enc.stats.eos_already_present >= 1


@pytest.mark.parametrize("which", ["chatml", "llama3_eot", "llama3_base"])
def test_chat_template_pairs(which):
    tok = {"chatml": chatml_tokenizer, "llama3_eot": lambda: llama3_style_tokenizer("<|eot_id|>"),
           "llama3_base": llama3_style_tokenizer}[which]()
    enc = _enc(tok)
    msgs = [{"role": "user", "content": "Hello there!"}]
    p = _one(enc, msgs, "Hi, how are you?", "Go away.")
    gen_prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert list(p["prompt"]) == tok(gen_prompt, add_special_tokens=False)["input_ids"]
    assert list(p["prompt"]) == enc.encode_prompt(msgs)  # what a sampler feeds
    eos = tok.eos_token_id
    assert list(p["chosen"]).count(eos) == 1 and p["chosen"][-1] == eos
    if tok.bos_token_id is not None:
        assert list(p["prompt"]).count(tok.bos_token_id) == 1
        assert tok.bos_token_id not in p["chosen"]
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "Hi, how are you?"}],
                                   tokenize=False)
    text = tok.decode(list(p["prompt"]) + list(p["chosen"]), skip_special_tokens=False)
    if which == "llama3_base":  # template ends with <|eot_id|>; base EOS appended after it
        assert text == full + "<|end_of_text|>"
    else:  # EOS closes the turn inside the template; whitespace after it dropped
        assert text == full.rstrip()


def test_truncation_modes_and_counts():
    tok = llama3_style_tokenizer()
    long_prompt = " ".join(f"w{i}" for i in range(60))
    resp = " a b c d e f g h i j k l m n o p q r s t"
    for mode in ("keep_end", "keep_start"):
        enc = _enc(tok, max_length=32, max_prompt_length=12, truncation_mode=mode)
        p = _one(enc, long_prompt, resp)
        full = enc.encode_prompt(long_prompt)
        assert len(p["prompt"]) == 12 and p["prompt"][0] == tok.bos_token_id
        if mode == "keep_end":
            assert list(p["prompt"][1:]) == full[-11:]
        else:
            assert list(p["prompt"]) == full[:12]
        assert len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) <= 32
        assert enc.stats.prompt_truncated == 1 and enc.stats.responses_truncated == 1
    short = _enc(tok, max_length=512, max_prompt_length=4)
    p = _one(short, long_prompt, resp)  # fits max_length: no truncation even if prompt > 4
    assert len(p["prompt"]) > 4 and short.stats.prompt_truncated == 0


def test_masks_never_cover_prompt_or_padding_when_pad_is_eos():
    tok = llama3_style_tokenizer()
    tok.pad_token = tok.eos_token
    enc = _enc(tok)
    pairs = enc([RawPair("Human: hi\n\nAssistant:", " Hello!", " No."),
                 RawPair("Human: what is the capital of France?\n\nAssistant:", " Paris.",
                         " I do not know the answer.")], BadRows())
    plan = plan_unpacked(seq_lengths_of(pair_lengths(pairs)), [64])
    seqs = dict(enumerate(sequences(pairs)))
    b = materialise(plan, seqs, 0, plan.rows, tok.pad_token_id)
    for r, (tokens, n_prompt) in seqs.items():
        n = len(tokens)
        assert b["loss_mask"][r, :n_prompt].sum() == 0 and b["loss_mask"][r, n:].sum() == 0
        assert b["loss_mask"][r, n - 1] == 1 and b["input_ids"][r, n - 1] == tok.pad_token_id
        assert (b["input_ids"][r, n:] == tok.pad_token_id).all()
    assert b["loss_mask"].sum() == sum(len(t) - p for t, p in seqs.values())
    assert np.all(b["loss_mask"][b["segment_ids"] == 0] == 0)
