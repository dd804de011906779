"""The IMDb frontier's fluency measure: samples' and real continuations' perplexity under SFT
(``dpo_jax/proj/imdb/evaluate.py``), against numpy on token ids we choose; and the variants
that import a checkpoint keep its shape (the cpu shape's overrides never replace its layers)."""

from __future__ import annotations

import json
import math
import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dpo_jax.data.testing import gpt2_style_tokenizer
from dpo_jax.proj.imdb import evaluate
from dpo_jax.proj.imdb.frontier import FrontierPoint, read_frontier_csv, write_frontier_csv
from dpo_jax.proj.imdb.pairs import make_prefixes
from tests import helpers

REVIEWS = ["the movie was great and the plot was fun<br />I loved it",
           "boring",  # shorter than any continuation: EOS follows its last token
           "this film was awful and the ending was dull and bad and the music was worse too"]


def test_sft_perplexity_is_exp_of_mean_token_nll():
    logps, tokens = np.array([-3.0, -10.0, -0.5]), np.array([2, 5, 1])
    assert evaluate.sft_perplexity(logps, tokens) == pytest.approx(math.exp(13.5 / 8))
    with pytest.raises(ValueError, match="no scored token"):
        evaluate.sft_perplexity(np.zeros(2), np.zeros(2))


def test_point_carries_the_samples_perplexity_under_sft():
    rows = [{"policy_logp": -4.0, "ref_logp": -6.0, "reward": 1.0, "completion_tokens": 3},
            {"policy_logp": -2.0, "ref_logp": -1.0, "reward": 0.0, "completion_tokens": 1}]
    p = evaluate.point("dpo", "beta=0.1", 5, rows)
    assert p["sft_ppl"] == pytest.approx(math.exp(7.0 / 4))
    assert p["kl"] == pytest.approx(np.mean([-4.0 + 6.0, -2.0 + 1.0]))


def _exp(tok, n_new):
    return types.SimpleNamespace(
        tokenizer=tok, texts=lambda split, limit: list(REVIEWS),
        imdb=ml_collections.ConfigDict(dict(max_test_reviews=0, max_new_tokens=n_new,
                                            max_prefix_tokens=4, sample_batch=2)),
        # a "model" whose log-prob of token t at position i is -(t + i) / 100: numpy can
        # recompute every scored sum from the ids and positions alone
        score=lambda params, ids, seg: -(ids + jnp.arange(ids.shape[1])[None]) / 100.0 * seg)


def test_real_continuations_follow_the_prefix_and_end_with_eos_when_the_review_does():
    tok = gpt2_style_tokenizer()
    eos, n = int(tok.eos_token_id), 5
    prefixes = make_prefixes(REVIEWS, tok, 2, 4, seed=3)
    prompts = [{"prompt": p.text, "prompt_ids": list(p.token_ids),
                "source": f"test:{p.source_index}"} for p in prefixes]
    rows = evaluate.continuations(_exp(tok, n), prompts, n)
    for p, r in zip(prefixes, rows):
        ids = tok.encode(REVIEWS[p.source_index].replace("<br />", " "),
                         add_special_tokens=False)
        P = len(p.token_ids)
        want = ids[P:P + n] + ([eos] if len(ids) <= P + n else [])
        assert r["prompt_ids"] == list(p.token_ids) and r["completion_ids"] == want[:n]
    assert any(r["completion_ids"][-1] == eos for r in rows)  # the short review ends


def test_real_fluency_scores_exactly_the_continuation_tokens():
    tok = gpt2_style_tokenizer()
    n = 5
    prefixes = make_prefixes(REVIEWS, tok, 2, 4, seed=3)
    prompts = [{"prompt": p.text, "prompt_ids": list(p.token_ids),
                "source": f"test:{p.source_index}"} for p in prefixes]
    exp = _exp(tok, n)
    out = evaluate.real_fluency(exp, None, prompts)
    rows = evaluate.continuations(exp, prompts, n)
    nll = sum((t + i) / 100.0 for r in rows
              for i, t in enumerate(r["prompt_ids"] + r["completion_ids"])
              if i >= len(r["prompt_ids"]))
    tokens = sum(len(r["completion_ids"]) for r in rows)
    assert out["rows"] == len(rows) == 3 and out["tokens"] == tokens  # 3 rows: 2 batches of 2
    assert out["sft_ppl"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)


def test_frontier_csv_keeps_perplexity_and_reads_older_files(tmp_path):
    pts = [FrontierPoint("dpo", "beta=0.1", 100, 4.0, 0.8, 31.5),
           FrontierPoint("sft", "", 0, 0.0, 0.1)]
    back = read_frontier_csv(write_frontier_csv(pts, tmp_path / "f.csv"))
    assert back[0].sft_ppl == 31.5 and back[1].sft_ppl is None
    (tmp_path / "old.csv").write_text("method,setting,step,kl,mean_reward\ndpo,,1,2.0,0.5\n")
    assert read_frontier_csv(tmp_path / "old.csv")[0].sft_ppl is None


def _variant(name):
    return helpers.load_module("configs/imdb.py", "imdb_cfg").get_config(name)


@pytest.mark.slow
def test_smollm2_variant_runs_the_pipeline_on_a_checkpoint_with_its_tokenizer(tmp_path,
                                                                             monkeypatch):
    """``configs/imdb.py:smollm2`` at the tiny variant's counts, on a tiny random Llama saved
    as a Hugging Face directory with a ChatML tokenizer (EOS ``<|im_end|>``, as SmolLM2's) in
    place of SmolLM2: SFT starts from the checkpoint, every stage runs, every frontier point and
    the real continuations carry a finite perplexity under SFT."""
    import jax

    from dpo_jax.data.testing import chatml_tokenizer
    from dpo_jax.models import Model, preset
    from dpo_jax.models.hf import save_hf
    from dpo_jax.models.local import MODELS_ENV, SMOLLM2
    from dpo_jax.tasks import get_task
    from tests._imdb_common import write_shards

    cfg = preset("tiny-llama", vocab_size=512, max_len=64)
    save_hf(str(tmp_path / "models" / SMOLLM2), cfg, Model(cfg).init(jax.random.key(0)),
            tokenizer=chatml_tokenizer())
    monkeypatch.setenv(MODELS_ENV, str(tmp_path / "models"))
    write_shards(tmp_path / "imdb")
    c, tiny = _variant("smollm2"), _variant("tiny")
    keep = {"tokenizer": c.imdb.tokenizer}
    c.imdb = tiny.imdb
    c.imdb.update(keep, data_dir=str(tmp_path / "imdb"), online_iterations=(),
                  baselines=("preferred_ft",))
    c.data.buckets, c.train.log_every = tiny.data.buckets, 1
    summary = get_task(c.task)(c, str(tmp_path / "work"))
    points = summary["frontier"]
    assert {p["method"] for p in points} == {"dpo", "preferred_ft", "ppo", "ppo_gt", "sft",
                                             "best_of_n"}
    assert all(p["sft_ppl"] is not None and 1.0 < p["sft_ppl"] < 1e4 for p in points)
    real = summary["real_fluency"]
    assert real["rows"] > 0 and 1.0 < real["sft_ppl"] < 1e4
    sft_run = json.loads((tmp_path / "work" / "sft" / "config.json").read_text())
    assert sft_run["model"]["hf_path"].endswith(SMOLLM2)


@pytest.mark.parametrize("variant", ["paper", "smollm2"])
def test_variants_importing_a_checkpoint_keep_its_shape(variant):
    c = _variant(variant)
    assert c.model.hf_path and dict(c.model.overrides) == {}
