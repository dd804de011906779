"""The data streams of the tasks that train on preference pairs (DPO, reward model, Unlikelihood).

Each split is tokenised once, checked against the model it will feed (token ids inside the
embedding table, lengths inside a learned position table: ``data.checks``), given its stored
reference log-probs when the run precomputes them (``dpo_jax/reference.py``: arrays handed to
the pipeline at construction), and wrapped in a resumable batch stream.
"""

from __future__ import annotations

import jax
from absl import logging

from dpo_jax import data as data_lib


def check_fits(pairs, model_cfg, *, pad_id: int, where: str, tokenizer=None) -> None:
    """``data.checks.check_fits_model`` for the model described by ``model_cfg``."""
    from dpo_jax.data.checks import check_fits_model

    check_fits_model(pairs, vocab_size=model_cfg.vocab_size,
                     max_positions=model_cfg.max_len if model_cfg.position == "learned" else None,
                     pad_id=pad_id, where=where,
                     tokenizer_size=None if tokenizer is None else len(tokenizer))


def load_pairs(rc, splits, model_cfg) -> tuple[dict, dict, object]:
    """``({split: pairs}, {split: stats}, tokenizer)``, checked against ``model_cfg``.

    Raises DataError when the data cannot fit the model, naming the config fields to change."""
    tokenizer = None if rc.data.source == "synthetic" else data_lib.load_tokenizer(rc.data.tokenizer)
    pairs, stats = {}, {}
    for split in splits:
        pairs[split], stats[split] = data_lib.load_tokenised_pairs(rc.data, split, tokenizer)
    pad_id = data_lib.pad_id_for(tokenizer)
    for split, items in pairs.items():
        check_fits(items, model_cfg, pad_id=pad_id, where=f"data split {split!r}",
                   tokenizer=tokenizer)
    return pairs, stats, tokenizer


def preference_streams(rc, splits, *, model_cfg, mesh, reference=None) -> dict:
    """``{split: PreferencePipeline}`` for ``splits`` ('train', 'eval').

    ``reference = (model, ref_params, cache_dir)`` precomputes (or reloads, by fingerprint)
    the reference log-probs of every pair and gives them to the pipelines."""
    pairs, stats, tokenizer = load_pairs(rc, splits, model_cfg)
    pad_id = data_lib.pad_id_for(tokenizer)
    stored = {}
    if reference is not None:
        from dpo_jax import reference as ref_lib

        model, ref_params, cache_dir = reference
        stored, info = ref_lib.reference_logps(
            model, ref_params, pairs, data_cfg=rc.data, step_cfg=rc.step, mesh=mesh,
            batch_size=rc.train.eval_batch_size, cache_dir=cache_dir,
            tokenizer_name=str(rc.data.tokenizer), pad_id=pad_id,
            ref_source=dict(policy=rc.sources.policy, hf_path=rc.sources.policy_hf,
                            reference=rc.sources.reference, ref_hf_path=rc.sources.reference_hf,
                            ref_param_dtype=rc.sources.reference_dtype))
        logging.info("reference log-probs %s", info)
    sizes = {"train": rc.train.batch_size, "eval": rc.train.eval_batch_size}
    return {split: data_lib.PreferencePipeline(
        pairs[split], rc.data, train=split == "train", global_batch_size=sizes[split],
        process_index=jax.process_index(), process_count=jax.process_count(), seed=rc.seed,
        pad_id=pad_id, load_stats=stats[split], reference=stored.get(split))
        for split in splits}
