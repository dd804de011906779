"""Mixtures (``data.sources``): every batch holds the sources by weight, deterministically;
exact resume; per-source stats and eval streams; bad entries name the source and field."""

import json

import numpy as np
import pytest

from dpo_jax import eval_metrics, preference_data
from dpo_jax.config import base_config, read_config
from dpo_jax.data import DataError, build_pipeline, default_data_config
from dpo_jax.data.mixture import interleave, mixture_counts, mixture_sources
from dpo_jax.data.testing import gpt2_style_tokenizer
from tests import helpers

B = 8
WORDS = ["good", "bad", "movie", "film", "great", "boring", "the", "was", "loved", "it"]


def _file(path, tag, n, seed):
    rng = np.random.default_rng(seed)
    rows = [{"prompt": f"{tag} {i} " + " ".join(rng.choice(WORDS, 3)) + ":",
             "chosen": " " + " ".join(rng.choice(WORDS, 2)),
             "rejected": " " + " ".join(rng.choice(WORDS, 4))} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def mix(tmp_path):
    tok = gpt2_style_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    c = default_data_config()
    c.tokenizer = str(tmp_path / "tok")
    c.max_length, c.max_prompt_length, c.buckets = 48, 24, "48"
    c.eval_fraction = 0.2
    c.sources = [
        dict(source="generic", path=_file(tmp_path / "a.jsonl", "A", 60, 0), weight=1.0),
        dict(source="generic", path=_file(tmp_path / "b.jsonl", "B", 24, 1), weight=3.0,
             name="b_side")]
    return c, tok


def _sources_of(pipe, epoch, position):
    idx, weight = pipe.batch_items(epoch, position)
    n_a = pipe.mixture[0][2]
    return (idx[weight > 0] >= n_a).astype(int)  # 0: source A, 1: source B


def test_batches_hold_the_sources_by_weight(mix):
    cfg, tok = mix
    pipe = build_pipeline(cfg, split="train", global_batch_size=B, seed=0, tokenizer=tok)
    names = [m[0] for m in pipe.mixture]
    assert names == ["generic", "b_side"] and pipe.mixture[0][1:] == (1.0, 48)
    N = pipe.num_items
    for epoch in (0, 1):
        for position in range(pipe.num_batches):
            share_b = _sources_of(pipe, epoch, position).sum()
            assert abs(share_b - 0.75 * B) <= 1, (epoch, position, share_b)
    # source B (19 train pairs, 3/4 of the slots) repeats its pairs; A is subsampled
    epoch0 = pipe.epoch_batches(0).reshape(-1)
    assert len(set(epoch0[epoch0 >= 48])) == 19 and len(set(epoch0[epoch0 < 48])) < 48
    for _ in range(3):
        next(pipe)
    stats = pipe.stats["mixture"]
    assert stats["b_side"]["target_fraction"] == 0.75
    assert abs(stats["b_side"]["epoch_fraction"] - 0.75) <= 1 / (N // B * B)
    assert stats["b_side"]["served_pairs"] + stats["generic"]["served_pairs"] == 3 * B
    assert stats["generic"]["pairs"] == 48 and stats["b_side"]["pairs"] == 19
    assert pipe.stats["sources"]["b_side"]["split"]["holdout"]["train_pairs"] == 19


def test_mixture_is_deterministic_and_resumes_exactly(mix):
    cfg, tok = mix
    build = lambda c: build_pipeline(c, split="train", global_batch_size=B, seed=5,  # noqa
                                     tokenizer=tok)
    full = build(cfg)
    want = [next(full) for _ in range(9)]  # crosses an epoch boundary
    state = helpers.assert_resumes(lambda: build(cfg), want, after=4)
    other = cfg.copy_and_resolve_references()
    other.sources = [dict(s, weight=1.0) for s in cfg.sources]
    with pytest.raises(DataError, match="mixture"):
        build(other).load_state_dict(state)
    single = cfg.copy_and_resolve_references()
    single.update(sources=[], source="generic", path=cfg.sources[0]["path"])
    with pytest.raises(DataError, match="mixture"):
        build(single).load_state_dict(state)


def test_counts_and_interleaving():
    assert mixture_counts([1, 1, 1], 10).tolist() == [4, 3, 3]
    ids = interleave([6, 2])  # source 1 at 1/4 and 3/4 of the 8 slots, after ties with 0
    assert ids.tolist() == [0, 0, 1, 0, 0, 0, 1, 0]
    assert set(np.diff(np.flatnonzero(ids == 1)).tolist()) == {4}


def _run_config(data_cfg, **model_overrides):
    """The run config (read) of the mixture ``data_cfg``: vocabulary 512 (the mixture's
    tokenizer), eval batches of 8, ``model_overrides`` added."""
    c = base_config()
    c.data = data_cfg
    c.model.overrides.update(vocab_size=512, **model_overrides)
    c.train.eval_batch_size = 8
    return read_config(c)


def test_per_source_eval_streams_and_metrics(mix, tmp_path):
    cfg, _ = mix
    rc = _run_config(cfg)
    data = preference_data.preference_streams(rc, ("train", "eval"), model_cfg=rc.model, mesh=None)
    assert sorted(data) == ["eval", "eval/b_side", "eval/generic", "train"]
    sizes = {k: len(v.pairs) for k, v in data.items()}
    assert sizes["eval"] == sizes["eval/generic"] + sizes["eval/b_side"] == (60 - 48) + (24 - 19)
    # Each source's totals: a metric summing to n^2 over its n pairs (mean n), weight n. The
    # overall mean comes from the summed totals, not from another pass over the eval stream.
    def totals_of(stream):
        n = float(len(stream.pairs))
        return lambda state: {"size": (n * n, n)}

    a, b = sizes["eval/generic"], sizes["eval/b_side"]
    assert eval_metrics.evaluator_by_source(totals_of, data)(None) == pytest.approx(
        {"size": (a * a + b * b) / (a + b), "generic/size": a, "b_side/size": b})


@pytest.mark.parametrize("entry, match", [
    (dict(source="generic", path="x.jsonl", weight=0), r"sources\[1\] \(source 'generic'\).*'weight'"),
    (dict(source="generic", path="x.jsonl", weight=-1.0), r"'weight' must be a positive"),
    (dict(source="generic", path="x.jsonl", weight="2"), r"'weight' must be a positive"),
    (dict(source="generic", path="x.jsonl", tokenizer="t"), r"\['tokenizer'\] are not per-source"),
    (dict(path="x.jsonl"), r"sources\[1\]: field 'source' is required"),
    (dict(source="generic"), r"sources\[1\] \(source 'generic'\): data.path is required"),
])
def test_bad_entries_name_the_source_and_field(mix, entry, match):
    cfg, _ = mix
    cfg.sources = [cfg.sources[0], entry]
    with pytest.raises(ValueError, match=match):
        mixture_sources(cfg)


def test_per_source_reference_log_probs_are_slices_of_the_eval_split(mix, tmp_path):
    """With a precomputed reference, each source's eval stream gets its block of the eval
    split's stored log-probs (computed once), in the eval split's order."""
    import jax

    from dpo_jax.models import Model
    from dpo_jax.sharding import make_mesh

    cfg, _ = mix
    rc = _run_config(cfg, n_layer=1)
    model = Model(rc.model)
    params = jax.jit(model.init)(jax.random.key(0))
    data = preference_data.preference_streams(rc, ("train", "eval"), model_cfg=rc.model,
                                      mesh=make_mesh({"data": -1}),
                                      reference=(model, params, str(tmp_path / "ref")))
    whole = data["eval"].reference
    start = 0
    for name in ("generic", "b_side"):
        part = data[f"eval/{name}"].reference
        n = len(data[f"eval/{name}"].pairs)
        for got, want in zip(part, whole):
            np.testing.assert_array_equal(got, want[start:start + n])
        start += n
    assert start == len(data["eval"].pairs)
