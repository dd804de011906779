"""Tokenisation guarantees on every tokenizer family the README lists, all built locally (the real
GPT-2 files too when present): the prompt/response boundary, BOS once, exactly one end token by
every path, chat templates, truncation, masks."""

import numpy as np
import pytest

from dpo_jax.data import DataError
from dpo_jax.data.batching import (materialise, pair_lengths, plan_unpacked, seq_lengths_of,
                                   sequences)
from dpo_jax.data.errors import BadRows
from dpo_jax.data.sources import RawPair
from dpo_jax.data.testing import (MISTRAL_TEMPLATE, chatml_tokenizer, gpt2_style_tokenizer,
                                  llama2_style_tokenizer, llama3_style_tokenizer)
from tests import helpers

FAMILIES = {
    "gpt2_local": gpt2_style_tokenizer,
    "llama3": llama3_style_tokenizer,
    "llama3_eot": lambda: llama3_style_tokenizer("<|eot_id|>"),
    "llama2": llama2_style_tokenizer,
    "mistral": lambda: llama2_style_tokenizer(MISTRAL_TEMPLATE),
    "chatml": chatml_tokenizer,
}
CHAT = ["llama3", "llama3_eot", "llama2", "mistral", "chatml"]


def _tokenizer(name):
    return helpers.shared_gpt2_tokenizer() if name == "gpt2_real" else FAMILIES[name]()


@pytest.fixture(scope="module", params=["gpt2_real"] + list(FAMILIES))
def tok(request):
    return _tokenizer(request.param)


_enc = helpers.pair_tokenizer


def _one(enc, prompt, chosen, rejected="Something else entirely."):
    return enc([RawPair(prompt, chosen, rejected)], BadRows("error"))[0]


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


BOUNDARY = [
    ("Q: what is 2+2?\nA:", "4"),  # no space: SentencePiece must not insert one
    ("Q: what is 2+2?\nA:", " 5"),
    ("\n\nHuman: hi there\n\nAssistant:", " Hello! How are you?"),
    ("SUBREDDIT: r/tifu\nTITLE: t\nPOST: my friend\nTL;DR: ", "friend was late"),  # trailing space
    ("The movie was", " great, I loved it."),
    ("Question:\n", "\nAnswer: yes"),
    ("Question:\n", "Answer: yes"),  # Llama-3 keeps ':\n' as one prompt token
    ("Why?\n", "Because."),
    ("Hello there!  ", "How are you today?"),
    ("", "Hello there!"),
    ("Human: hi", "\n\nAssistant: ok"),
]


@pytest.mark.parametrize("mode", ["move", "keep"])
@pytest.mark.parametrize("prompt,response", BOUNDARY)
def test_boundary_is_the_joined_texts_tokens(tok, mode, prompt, response):
    """The response tokens are exactly the joined text's tokens after the prompt's tokens, and
    the prompt's tokens are what a sampler feeds; where the tokenizer cannot split there the
    row is reported, never trained with a made-up split."""
    enc = _enc(tok, prompt_trailing_whitespace=mode)
    rejected = response + " Not really."
    joined = _ids(tok, prompt + response)
    prompt_ids = enc.encode_prompt(prompt)
    raw_prompt = prompt_ids[1:] if enc.bos is not None else prompt_ids
    try:
        p = _one(enc, prompt, response, rejected)
    except DataError as e:
        if not prompt_ids:  # no BOS: nothing would predict the first response token
            assert e.reason == "unscored_first_token" and e.field == "prompt"
            return
        assert e.reason == "boundary" and e.field in ("chosen", "rejected")
        splits = [_ids(tok, prompt + r)[:len(raw_prompt)] == raw_prompt for r in (response,
                                                                                   rejected)]
        assert not all(splits)  # reported only where the split really does not exist
        return
    assert list(p["prompt"]) == prompt_ids
    assert (p["prompt"][0] == enc.bos) == (enc.bos is not None)
    body = list(p["prompt"][1:] if enc.bos is not None else p["prompt"]) + list(p["chosen"][:-1])
    assert body == joined
    assert p["chosen"][-1] == tok.eos_token_id and tok.eos_token_id not in p["chosen"][:-1]
    text = tok.decode(body, skip_special_tokens=False)
    assert text.strip() == (prompt + response).strip()  # SentencePiece drops one leading space


@pytest.mark.parametrize("name", ["gpt2_real", "gpt2_local", "llama3", "llama2"])
def test_move_is_needed_for_a_trailing_space(name):
    """'TL;DR: ' tokenised alone ends in a lone space token that the joined text never has:
    moved, the row tokenises; kept, it is reported (no split exists)."""
    tok = _tokenizer(name)
    prompt, resp = "TL;DR: ", "friend was late"
    enc = _enc(tok)
    p = _one(enc, prompt, resp)
    assert tok.decode(list(p["chosen"][:-1])).strip() == resp
    assert list(p["prompt"]) == enc.encode_prompt("TL;DR:") and enc.stats.prompt_whitespace_moved
    with pytest.raises(DataError, match="prompt_trailing_whitespace='move'") as e:
        _one(_enc(tok, prompt_trailing_whitespace="keep"), prompt, resp)
    assert e.value.reason == "boundary"


def test_sentencepiece_response_has_no_spurious_space():
    """The issue's case: Llama-2-style chosen '4' after 'A:' is ['4', '</s>'], not ['▁4', ...]."""
    tok = llama2_style_tokenizer()
    enc = _enc(tok)
    p = _one(enc, "Q: what is 2+2?\nA:", "4", " 5")
    assert tok.convert_ids_to_tokens(list(p["chosen"])) == ["4", "</s>"]
    assert tok.convert_ids_to_tokens(_ids(tok, "4")) != ["4"]  # alone it starts a word
    assert tok.decode(list(p["prompt"]) + list(p["chosen"][:-1]),
                      skip_special_tokens=True) == "Q: what is 2+2?\nA:4"
    assert tok.decode(list(p["prompt"]) + list(p["rejected"][:-1]),
                      skip_special_tokens=True) == "Q: what is 2+2?\nA: 5"


def test_unsplittable_boundary_reported_or_skipped():
    """'...grea' + 't' tokenises as '...', ' great': no split after the prompt's tokens exists;
    skip mode counts it."""
    tok = gpt2_style_tokenizer()
    pair = RawPair("The movie was grea", "t", "t!", file="x.jsonl", row=3)
    with pytest.raises(DataError, match=r"x.jsonl: row 3: field 'chosen'.*cannot split"):
        _enc(tok)([pair], BadRows("error"))
    bad = BadRows("skip")
    assert _enc(tok)([pair, RawPair("Hi", " yes", " no")], bad)[0]["chosen"].size
    assert bad.counts == {"boundary": 1}


# ------------------------------------------------------------------------------ end tokens

def _end_variants(tok, enc):
    """Ways a response can arrive: plain, ending in EOS, EOS twice, EOS then a newline, the
    template's turn end (when it differs)."""
    eos = tok.eos_token
    out = ["Yes", "Yes" + eos, "Yes" + eos + eos, "Yes" + eos + "\n", "Yes" + eos + " " + eos]
    if enc.turn_end is not None:
        out.append("Yes" + tok.convert_ids_to_tokens(enc.turn_end))
    return out


@pytest.mark.parametrize("path", ["text", "chat"])
def test_exactly_one_end_token_by_every_path(tok, path):
    enc = _enc(tok)
    if path == "chat" and not tok.chat_template:
        pytest.skip("no chat template")
    prompt = [{"role": "user", "content": "Is it?"}] if path == "chat" else "Q: Is it?\nA:"
    end = enc.turn_end if path == "chat" and enc.turn_end is not None else enc.eos
    chosen = []
    for resp in _end_variants(tok, enc):
        text = resp if path == "chat" else " " + resp
        p = _one(enc, prompt, text, "No")
        for field in ("chosen", "rejected"):
            ids = list(p[field])
            assert ids[-1] == end, (resp, field)
            assert sum(t in enc.end_ids for t in ids) == 1, (resp, field)
        chosen.append(list(p["chosen"]))
    assert all(c == chosen[0] for c in chosen)  # the text's own end tokens change nothing
    if path == "chat":  # and the turn is the template's, up to its closing token
        full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "Yes"}],
                                       tokenize=False)
        text = tok.decode(list(p["prompt"]) + chosen[0], skip_special_tokens=False)
        assert text.replace(" ", "") == full.rstrip().replace(" ", "")


def test_chatml_message_response_ending_in_im_end_keeps_one():
    """The issue's case: ChatML, message prompt, chosen 'Yes<|im_end|>' ends ... 's', '<|im_end|>'
    once, as the plain-text path does."""
    tok = chatml_tokenizer()
    enc = _enc(tok)
    msgs = [{"role": "user", "content": "Is it?"}]
    chat = _one(enc, msgs, "Yes<|im_end|>", "No")
    plain = _one(enc, "Is it?", " Yes<|im_end|>", " No")
    for p in (chat, plain):
        assert list(p["chosen"]).count(tok.eos_token_id) == 1
        assert p["chosen"][-1] == tok.eos_token_id and p["chosen"][-2] != tok.eos_token_id


def test_end_token_inside_a_response_is_reported():
    tok = chatml_tokenizer()
    for prompt in ("Q:", [{"role": "user", "content": "Q"}]):
        with pytest.raises(DataError, match="before the response's end") as e:
            _one(_enc(tok), prompt, " Yes<|im_end|> and more", " No")
        assert e.value.reason == "end_token_inside" and e.value.field == "chosen"


def test_bos_once():
    for tok in (llama3_style_tokenizer(), llama2_style_tokenizer()):
        enc = _enc(tok)
        bos, eos = tok.bos_token_id, tok.eos_token_id
        p = _one(enc, "Human: hi\n\nAssistant:", " Hello there!")
        assert p["prompt"][0] == bos and (p["prompt"][1:] != bos).all() and bos not in p["chosen"]
        q = _one(enc, tok.bos_token + "Human: hi", " ok" + tok.eos_token)
        assert list(q["prompt"]).count(bos) == 1 and list(q["chosen"]).count(eos) == 1
        r = _one(enc, tok.bos_token * 2 + "Human: hi", " ok")
        assert list(r["prompt"]).count(bos) == 1
        assert enc.stats.bos_already_present == 2 and enc.stats.eos_already_present == 1


@pytest.mark.parametrize("which", CHAT)
def test_chat_template_pairs(which):
    tok = FAMILIES[which]()
    enc = _enc(tok)
    msgs = [{"role": "user", "content": "Hello there!"}]
    p = _one(enc, msgs, "Hi, how are you?", "Go away.")
    gen_prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    raw = _ids(tok, gen_prompt)
    assert list(p["prompt"]) == (raw if enc.bos is None or raw[:1] == [enc.bos]
                                 else [enc.bos] + raw)
    assert list(p["prompt"]) == enc.encode_prompt(msgs)  # what a sampler feeds
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "Hi, how are you?"}],
                                   tokenize=False)
    joined = _ids(tok, full)
    last_end = max(i for i, t in enumerate(joined) if t == enc.turn_end)
    assert joined[:len(raw)] == raw  # the response: the rest, through the turn's end token
    assert list(p["chosen"]) == joined[len(raw):last_end + 1]
    assert list(p["chosen"]).count(enc.turn_end) == 1
    if tok.bos_token_id is not None:
        assert list(p["prompt"]).count(tok.bos_token_id) == 1
        assert tok.bos_token_id not in p["chosen"]


def test_llama3_template_with_base_eos_ends_on_eot_only():
    """Turn end <|eot_id|> differs from EOS <|end_of_text|>: a message response ends with the
    turn end only; a text response with EOS; a sampler stops at either (``end_ids``)."""
    tok = llama3_style_tokenizer()
    enc = _enc(tok)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert enc.turn_end == eot != enc.eos and enc.end_ids == {eot, enc.eos}
    chat = _one(enc, [{"role": "user", "content": "hi"}], "Hello", "No")
    text = _one(enc, "hi", " Hello<|eot_id|>", " No")
    assert chat["chosen"][-1] == eot and enc.eos not in chat["chosen"]
    assert text["chosen"][-1] == enc.eos and eot not in text["chosen"]


# ------------------------------------------------------------------------------ truncation

@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
@pytest.mark.parametrize("name", ["llama3", "llama2", "gpt2_local"])
def test_truncation_modes_and_counts(name, mode):
    tok = _tokenizer(name)
    long_prompt = " ".join(f"w{i}" for i in range(60))
    resp = " a b c d e f g h i j k l m n o p q r s t"
    enc = _enc(tok, max_length=32, max_prompt_length=12, truncation_mode=mode)
    p = _one(enc, long_prompt, resp, " z y x w v u t s r q p o n m l k j i h g")
    full = enc.encode_prompt(long_prompt)
    assert len(p["prompt"]) == 12
    start = 1 if enc.bos is not None else 0  # BOS is kept in both modes
    assert list(p["prompt"][:start]) == full[:start]
    if mode == "keep_end":
        assert list(p["prompt"][start:]) == full[start:][-(12 - start):]
    else:
        assert list(p["prompt"]) == full[:12]
    # the longer response keeps exactly max_length - len(prompt) tokens (the paper's rule)
    assert len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) == 32
    assert enc.stats.prompt_truncated == 1 and enc.stats.responses_truncated == 1
    short = _enc(tok, max_length=512, max_prompt_length=4)
    q = _one(short, long_prompt, resp)  # fits max_length: no truncation even if prompt > 4
    assert len(q["prompt"]) > 4 and short.stats.prompt_truncated == 0


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
