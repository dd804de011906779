"""Train / eval overlap compared as what is trained and scored (token ids, not text), and the
split's held-out sizes reaching the pipeline's stats and the run summary."""

import json
import logging

import numpy as np
import pytest

from dpo_jax.data import build_pipeline
from dpo_jax.data.loading import load_tokenised_pairs
from dpo_jax.data.testing import chatml_tokenizer, gpt2_style_tokenizer, llama3_style_tokenizer
from tests import helpers, runs

TOKENIZERS = {"gpt2": gpt2_style_tokenizer, "llama3": llama3_style_tokenizer,
              "chatml": chatml_tokenizer}

# (prompt, chosen, rejected) of the train split; the eval split restates them with the
# whitespace, end-token text and template spacing moved around, plus rows that differ.
TRAIN = [(f"Topic {i}:", f" fine {i}", f" poor {i}") for i in range(6)]


def _eval_rows(eos: str):
    return [
        ("Topic 0: ", "fine 0", "poor 0"),  # trailing prompt space moved to the responses
        ("Topic 1:", " fine 1" + eos, " poor 1" + eos),  # end token written as text
        ("Topic 2:  ", "fine 2", "poor 2"),  # two spaces: differs from " fine 2"
        ("Topic 3:", " fine 3", " poor 3 "),  # a real difference in one response
        ("Topic 4;", " fine 4", " poor 4"),  # a different prompt
        ("Topic 5:\n", "fine 5", "poor 5"),  # a newline instead of the space
        ("Topic 0:", " poor 0", " fine 0"),  # the same prompt, responses swapped
    ]


def _independent_key(tok, prompt, chosen, rejected):
    """A pair as tokens, computed straight from the tokenizer: the prompt without its trailing
    whitespace when that whitespace tokenises apart (the rest's ids are a prefix of the
    whole's), each response as the ids of prompt + response text (without an end token
    written as text)."""
    eos = tok.eos_token

    def ids(text):
        return tuple(tok(text, add_special_tokens=False)["input_ids"])

    def strip_eos(r):
        return r[: -len(eos)] if r.endswith(eos) else r

    whole, rest = ids(prompt), ids(prompt.rstrip())
    p = rest if whole[:len(rest)] == rest else whole
    return p, ids(prompt + strip_eos(chosen)), ids(prompt + strip_eos(rejected))


def _write_splits(tmp_path, train, evals):
    helpers.write_jsonl(tmp_path / "train.jsonl",
                        [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in train])
    helpers.write_jsonl(tmp_path / "test.jsonl",
                        [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in evals])
    return str(tmp_path)


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
@pytest.mark.parametrize("fmt", ["pairs", "unpaired"])
def test_overlap_is_counted_on_tokens(tmp_path, caplog, name, fmt):
    tok = TOKENIZERS[name]()
    evals_raw = _eval_rows(tok.eos_token)
    cfg = helpers.data_config(source="generic", tokenizer="unused", format=fmt,
                              path=_write_splits(tmp_path, TRAIN, evals_raw))
    train_keys = {_independent_key(tok, *row) for row in TRAIN}
    eval_keys = [_independent_key(tok, *row) for row in evals_raw]
    if fmt == "pairs":
        want_pairs = sum(k in train_keys for k in eval_keys)
    else:  # each pair row is (prompt, chosen, desirable) and (prompt, rejected, undesirable)
        have = {(k[0], k[1], True) for k in train_keys} | {(k[0], k[2], False)
                                                          for k in train_keys}
        want_pairs = sum(((k[0], k[1], True) in have) + ((k[0], k[2], False) in have)
                         for k in eval_keys)
    want_prompts = len({k[0] for k in eval_keys} & {k[0] for k in train_keys})
    # The kind is tested, not a text comparison: most shared rows differ as text.
    assert not {tuple(r) for r in evals_raw} & set(TRAIN)
    assert want_pairs >= 2 and want_prompts >= 3
    assert want_pairs < len(evals_raw) * (1 if fmt == "pairs" else 2)

    with caplog.at_level(logging.WARNING, logger="dpo_jax.data"):
        evals, stats = load_tokenised_pairs(cfg, "eval", tok)
    assert stats["eval_pairs_in_train"] == want_pairs
    assert stats["eval_prompts_in_train"] == want_prompts
    assert f"eval shares {want_pairs} of its {len(evals)}" in caplog.text
    # The task's path hands the train items over instead of tokenising train again: same count.
    train, _ = load_tokenised_pairs(cfg, "train", tok)
    _, again = load_tokenised_pairs(cfg, "eval", tok, train_items=train)
    assert (again["eval_pairs_in_train"], again["eval_prompts_in_train"]) == (want_pairs,
                                                                              want_prompts)


def test_token_overlap_of_the_gpt2_style_variants_is_the_hand_count(tmp_path):
    """The independent key above, pinned by hand for one tokenizer: rows 0 and 1 are training
    pairs (space moved, end token as text), 5 has the training prompt's tokens only; 2, 3, 4,
    6 are not training pairs."""
    tok = gpt2_style_tokenizer()
    cfg = helpers.data_config(source="generic", tokenizer="unused",
                              path=_write_splits(tmp_path, TRAIN, _eval_rows(tok.eos_token)))
    _, stats = load_tokenised_pairs(cfg, "eval", tok)
    assert stats["eval_pairs_in_train"] == 2
    assert stats["eval_prompts_in_train"] == 5  # prompts 0, 1, 2, 3, 5 (4 has ';')


def test_ranked_lists_and_synthetic_items_report_overlap():
    cfg = helpers.data_config(format="ranked")
    cfg.synthetic.update(num_train=64, num_eval=16)
    from dpo_jax.data.loading import load_tokenised_items

    _, stats = load_tokenised_items(cfg, "eval")
    assert stats["eval_pairs_in_train"] == 0
    cfg.synthetic.eval_seed = cfg.synthetic.train_seed
    _, stats = load_tokenised_items(cfg, "eval")
    assert stats["eval_pairs_in_train"] == 16 and stats["eval_prompts_in_train"] >= 1


# ----------------------------------------------------------------------------- split stats


def _holdout_file(tmp_path, n_prompts=20, per_prompt=2):
    rows = [{"prompt": f"Case {i}:", "chosen": f" keep {j}", "rejected": f" drop {j}"}
            for i in range(n_prompts) for j in range(per_prompt)]
    return helpers.write_jsonl(tmp_path / "pairs.jsonl", rows)


def test_held_out_sizes_reach_the_pipeline_stats(tmp_path):
    cfg = helpers.data_config(source="generic", tokenizer="unused", eval_fraction=0.2,
                              path=_holdout_file(tmp_path))
    tok = gpt2_style_tokenizer()
    want = {"by": "eval_fraction", "eval_prompts": 4, "prompts": 20, "eval_pairs": 8,
            "train_pairs": 32}
    for split, n in (("train", 32), ("eval", 8)):
        pipe = build_pipeline(cfg, split=split, global_batch_size=4, tokenizer=tok)
        holdout = dict(pipe.stats["split"]["holdout"])
        assert "4 of 20 prompts" in holdout.pop("note") and holdout == want
        assert pipe.stats["split"]["dataset_split"] == "train"
        assert pipe.stats["stream"] == split and pipe.stats["num_pairs"] == n


@pytest.mark.slow  # a whole run for a summary field
def test_held_out_sizes_reach_the_run_summary(tmp_path):
    tok = gpt2_style_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    c = runs.dpo_config(steps=1, batch_size=8)
    c.model.overrides.vocab_size = len(tok)
    c.data.update(source="generic", path=_holdout_file(tmp_path, 24, 1),
                  tokenizer=str(tmp_path / "tok"), eval_fraction=0.25, max_length=32,
                  max_prompt_length=16)
    c.train.update(eval_batch_size=8, eval_every=1)
    summary = runs.run(c, tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    for s in (summary, on_disk):
        data = s["data"]
        assert data["train"]["split"]["holdout"] == data["eval"]["split"]["holdout"]
        holdout = dict(data["train"]["split"]["holdout"])
        assert "6 of 24 prompts" in holdout.pop("note") and holdout == {
            "by": "eval_fraction", "eval_prompts": 6, "prompts": 24, "eval_pairs": 6,
            "train_pairs": 18}
        assert data["eval"]["eval_pairs_in_train"] == 0
        assert data["train"]["stream"] == "train" and data["eval"]["stream"] == "eval"
    assert np.isfinite(summary["final_eval"]["loss"])


def test_repeats_count_per_eval_pair_and_weights_are_not_compared(tmp_path):
    """Counted by hand (gpt2-style tokenizer, text source): eval holds training pair 0 twice
    (two eval pairs are training pairs: the count is over eval pairs, not train pairs), pair 1
    restated with its trailing prompt space moved and another ``data.weight_field`` weight (the
    same tokens: a weight is not what is trained or scored), and pair 2 with its responses
    swapped (another target). 3 pairs, 3 distinct prompts (0, 1, 2) shared."""
    tok = gpt2_style_tokenizer()
    rows = lambda split: [{"prompt": p, "chosen": c, "rejected": r, "w": w}  # noqa: E731
                          for p, c, r, w in split]
    train = [(*row, 1.0) for row in TRAIN]
    evals = [(*TRAIN[0], 1.0), (*TRAIN[0], 1.0), ("Topic 1: ", "fine 1", "poor 1", 0.25),
             ("Topic 2:", " poor 2", " fine 2", 1.0)]
    helpers.write_jsonl(tmp_path / "train.jsonl", rows(train))
    helpers.write_jsonl(tmp_path / "test.jsonl", rows(evals))
    cfg = helpers.data_config(source="generic", tokenizer="unused", path=str(tmp_path),
                              weight_field="w")
    for train_items in (None, load_tokenised_pairs(cfg, "train", tok)[0]):
        pairs, stats = load_tokenised_pairs(cfg, "eval", tok, train_items=train_items)
        assert sorted(p.get("weight", 1.0) for p in pairs) == [0.25, 1.0, 1.0, 1.0]
        assert (stats["eval_pairs_in_train"], stats["eval_prompts_in_train"]) == (3, 3)
