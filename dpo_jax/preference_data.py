"""Preference data for a task (DPO, reward model, Unlikelihood, online DPO's eval): the
tokenised, checked pairs of each split and one resumable ``PreferencePipeline`` per split.

(The batch-stream skeleton those pipelines share is ``dpo_jax.data.stream``.)

Each split is tokenised once, checked against the model it will feed (token ids inside the
embedding table, lengths inside a learned position table: ``data.checks``), given its stored
reference log-probs when the run precomputes them (``dpo_jax/reference.py``: arrays handed to
the pipeline at construction), and wrapped in a resumable batch stream.
"""

from __future__ import annotations

import jax
from absl import logging

from dpo_jax import ches_filter as ches_lib
from dpo_jax import data as data_lib
from dpo_jax import sharding as shard_lib
from dpo_jax import reference as ref_lib
from dpo_jax.data import tree_data
from dpo_jax.data.checks import check_fits_model
from dpo_jax.data.loading import load_mixture_pairs, pipeline_class
from dpo_jax.data.ranked import pair_views


def check_fits(pairs, model_cfg, *, pad_id: int, where: str, tokenizer=None) -> None:
    """``data.checks.check_fits_model`` for the model described by ``model_cfg``."""
    check_fits_model(pair_views(pairs), vocab_size=model_cfg.vocab_size,
                     max_positions=model_cfg.max_len if model_cfg.position == "learned" else None,
                     pad_id=pad_id, where=where,
                     tokenizer_size=None if tokenizer is None else len(tokenizer))


def load_pairs(rc, splits, model_cfg) -> tuple[dict, dict, object]:
    """``({split: pairs}, {split: stats}, tokenizer)``, checked against ``model_cfg``.

    With ``data.sources`` (a mixture) each split holds every source's pairs and, for 'eval',
    each source's eval pairs are also split ``'eval/<name>'``; ``stats[split]['mixture_counts']``
    is ``[(name, weight, pairs)]`` (``PreferencePipeline``'s ``mixture``).

    Raises DataError when the data cannot fit the model, naming the config fields to change."""
    mixed = rc.data.mixed
    tokenizer = None if rc.data.tokenised else data_lib.load_tokenizer(rc.data.tokenizer)
    pairs, stats = {}, {}
    for split in splits:
        if not mixed:
            pairs[split], stats[split] = data_lib.load_tokenised_pairs(
                rc.data, split, tokenizer, train_items=pairs.get("train"))
            continue
        by_source = None
        if "train" in pairs:  # each source's train pairs, for eval's overlap count
            by_source, start = {}, 0
            for name, _, count in stats["train"]["mixture_counts"]:
                by_source[name] = pairs["train"][start:start + count]
                start += count
        pairs[split], stats[split], mixture = load_mixture_pairs(rc.data, split, tokenizer,
                                                                 train_items=by_source)
        stats[split]["mixture_counts"] = mixture
        if split == "eval":
            start = 0
            for name, _, count in mixture:
                pairs[f"eval/{name}"] = pairs[split][start:start + count]
                stats[f"eval/{name}"] = stats[split]["sources"][name]
                start += count
    pad_id = data_lib.pad_id_for(tokenizer)
    for split, items in pairs.items():
        check_fits(items, model_cfg, pad_id=pad_id, where=f"data split {split!r}",
                   tokenizer=tokenizer)
    return pairs, stats, tokenizer


def filter_by_ches(rc, pairs, stats, *, model, params, cache_dir, mesh, pad_id) -> None:
    """``data.ches_filter`` (``dpo_jax/ches_filter.py``) applied to ``pairs['train']`` in place:
    scores under ``params`` (the starting policy) loaded from or stored in ``cache_dir``; a
    mixture's per-source counts follow. ``stats['train']['ches_filter']`` records what was done.
    Raises DataError when a mixture source would be left without pairs."""
    src = rc.param_sources
    scores, info = ches_lib.ches_scores_of(
        model, params, pairs["train"], data_cfg=rc.data, step_cfg=rc.step, mesh=mesh,
        batch_size=rc.train.eval_batch_size, cache_dir=cache_dir,
        tokenizer_name=str(rc.data.tokenizer), pad_id=pad_id,
        source=dict(policy=src.policy, hf_path=src.policy_hf, seed=src.seed))
    pairs["train"], kept, filter_stats = ches_lib.apply(pairs["train"], scores,
                                                        rc.data.ches_filter)
    stats["train"]["ches_filter"] = {**filter_stats, **info}
    logging.info("data.ches_filter: %s", stats["train"]["ches_filter"])
    mixture, start = stats["train"].get("mixture_counts"), 0
    for i, (name, weight, count) in enumerate(mixture or ()):
        left = int(kept[start:start + count].sum())
        if not left:
            raise data_lib.DataError(f"data.ches_filter drops every train pair of mixture source "
                                     f"{name!r}; raise data.ches_filter.quantile")
        mixture[i], start = (name, weight, left), start + count


def preference_streams(rc, splits, *, model_cfg, mesh, reference=None, ches=None) -> dict:
    """``{split: PreferencePipeline}`` for ``splits`` ('train', 'eval').

    ``ches = (model, params, cache_dir)``: the starting policy that ``data.ches_filter`` scores
    the train pairs with (:func:`filter_by_ches`, before anything else reads them); required
    when the filter is on (ValueError). ``reference = (model, ref_params, cache_dir)``
    precomputes (or reloads, by fingerprint) the reference log-probs of every pair and gives
    them to the pipelines."""
    pairs, stats, tokenizer = load_pairs(rc, splits, model_cfg)
    pad_id = data_lib.pad_id_for(tokenizer)
    if rc.data.ches_filter.mode:
        if ches is None:
            raise ValueError("data.ches_filter is applied by the DPO task (task='dpo'); set "
                             "data.ches_filter.mode=''")
        model, params, cache_dir = ches
        filter_by_ches(rc, pairs, stats, model=model, params=params, cache_dir=cache_dir,
                       mesh=mesh, pad_id=pad_id)
    stored = {}
    if reference is not None and rc.data.format not in ("pairs", "trees"):
        raise ValueError(f"data.format={rc.data.format!r}: stored reference log-probs are for "
                         "pairs and binary preference trees; set "
                         "logprobs.precompute_reference=False")
    if reference is not None:
        model, ref_params, cache_dir = reference
        src = rc.param_sources
        # A mixture's per-source eval splits are slices of 'eval': computed once, sliced below.
        # Trees: their branch points unrolled into pairs, in tree order (one row each, what
        # TreePipeline(reference=...) reads; equal to the tree forward's to round-off).
        as_pairs = tree_data.unrolled_pairs if rc.data.format == "trees" else (lambda x: x)
        stored, info = ref_lib.reference_logps(
            model, ref_params, {k: as_pairs(v) for k, v in pairs.items() if "/" not in k},
            data_cfg=rc.data, step_cfg=rc.step, mesh=mesh,
            batch_size=rc.train.eval_batch_size, cache_dir=cache_dir,
            tokenizer_name=str(rc.data.tokenizer), pad_id=pad_id,
            ref_source=dict(policy=src.policy, hf_path=src.policy_hf, reference=src.reference,
                            ref_hf_path=src.reference_hf, ref_param_dtype=src.reference_dtype))
        logging.info("reference log-probs %s", info)
        start = 0
        for name, _, count in stats.get("eval", {}).get("mixture_counts", None) or ():
            stored[f"eval/{name}"] = tuple(x[start:start + count] for x in stored["eval"])
            start += count
    return {split: pipeline_class(rc.data)(
        pairs[split], rc.data, train=split == "train",
        global_batch_size=rc.train.batch_size if split == "train" else rc.train.eval_batch_size,
        process_index=jax.process_index(), process_count=jax.process_count(), seed=rc.seed,
        pad_id=pad_id, load_stats=stats[split], reference=stored.get(split),
        mixture=stats[split].pop("mixture_counts", None),
        row_multiple=1 if mesh is None else shard_lib.num_batch_shards(mesh))
        for split in pairs}
