"""Reading a split of any source in any format, and its pipeline: the dispatch on
``data.source`` and ``data.format`` above the format modules (pairs: ``sources`` / ``tokenize``
/ ``pipeline``; ranked lists: ``ranked``; unpaired completions: ``unpaired``; StackExchange:
``stackexchange``). Nothing in ``dpo_jax.data`` below it imports it (ARCHITECTURE.md, "Layers").

* ``row_parser`` / ``parse_rows`` / ``load_raw_pairs`` / ``select_split``: raw rows of a split
  (train, or eval carved by prompt) -> ``RawPair`` / ``RawRanked`` / ``RawUnpaired``;
* ``load_tokenised_pairs`` / ``load_tokenised_items`` / ``load_mixture_pairs``: tokenised and
  checked items with their stats;
* ``pipeline_class`` / ``build_pipeline``: the batch stream of ``data.format``.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import numpy as np

from dpo_jax.data import config as config_lib
from dpo_jax.data import synthetic
from dpo_jax.data.checks import check_scored_pair, overlap_stats, warn_overlap
from dpo_jax.data.errors import BadRows, DataError
from dpo_jax.data.io import Row, read_rows
from dpo_jax.data.pipeline import PreferencePipeline, _synthetic_pairs, pad_id_for
from dpo_jax.data.ranked import (HUB_NAME, RANKED_PARSERS, Item, RankedPipeline, _checked_list,
                                 pair_views)
from dpo_jax.data.sources import (HUB_NAMES, PARSERS, RawPair, _cap_per_prompt, pair_weight,
                                  hold_out_prompts, prompt_key, same_rows_for_both_splits)
from dpo_jax.data.stackexchange import load_se_pairs
from dpo_jax.data.tokenize import PairTokenizer, TokenPair, length_summary, load_tokenizer
from dpo_jax.data.trees import BranchPoint
from dpo_jax.data.tree_data import (TreePipeline, branch_point_lengths, encode_trees,
                                    group_trees, parse_tree_row)
from dpo_jax.data.unpaired import (UnpairedPipeline, checked_unpaired, unpair_tokens,
                                   unpaired_parser)

log = logging.getLogger("dpo_jax.data")


def row_parser(source: str, cfg) -> Callable[..., Any]:
    """The row parser of ``source`` for ``data.format``: pairs (``PARSERS``), ranked lists
    (``data/ranked.py``) or unpaired completions (``data/unpaired.py``; one row may give
    several). Raises ValueError for a source without that format."""
    fmt = getattr(cfg, "format", "pairs") or "pairs"
    if fmt == "trees":
        if source != "generic":
            raise ValueError(f"data.source={source!r} has no preference trees; use 'generic'")
        return parse_tree_row
    if fmt == "ranked":
        if source not in RANKED_PARSERS:
            raise ValueError(f"data.source={source!r} has no ranked lists; ranked sources: "
                             f"{sorted(RANKED_PARSERS)} and synthetic")
        return RANKED_PARSERS[source]
    if fmt == "unpaired":
        return unpaired_parser(source)
    return PARSERS[source]


def parse_rows(source: str, rows: Iterable[Row], cfg, bad: BadRows) -> list[RawPair]:
    """Parse every row; rows that do not parse raise or are counted by ``bad``. Whether a pair
    can teach a preference is decided on its tokens (``checks.check_scored_pair``).
    ``cfg.weight_field`` (when set) gives each pair its weight (``pair_weight``)."""
    parser = row_parser(source, cfg)
    weight_field = getattr(cfg, "weight_field", "") or ""
    pairs: list[RawPair] = []
    for file, row, rec in rows:
        try:
            parsed = parser(rec, file, row, cfg)
            for pair in parsed if isinstance(parsed, list) else [parsed]:
                if pair is not None:
                    if weight_field:
                        pair.weight = pair_weight(rec, weight_field, file, row)
                    pairs.append(pair)
        except DataError as e:
            bad.handle(e)
    if source == "shp":
        pairs = _cap_per_prompt(pairs, cfg.shp_max_pairs_per_post)
    return pairs


def load_raw_pairs(cfg, split: str, bad: BadRows) -> list[RawPair]:
    """Parsed rows of dataset split ``split`` of ``cfg.path`` (a local copy, or the hub when
    the path is a name)."""
    if cfg.source == "se":  # many pairs per row, the paper's own split: stackexchange.py
        if (getattr(cfg, "format", "pairs") or "pairs") != "pairs":
            raise ValueError("data.source='se' reads pairs only (data.format='pairs')")
        return load_se_pairs(cfg, split, bad)
    path = cfg.path or HUB_NAMES.get(cfg.source, "")
    if not cfg.path and cfg.source == "ultrafeedback" and getattr(cfg, "format", "") == "ranked":
        path = HUB_NAME
    hub_config = cfg.hub_config
    if cfg.source == "tldr" and not hub_config and path == HUB_NAMES["tldr"]:
        hub_config = "comparisons"
    return parse_rows(cfg.source, read_rows(path, split, hub_config), cfg, bad)


# ------------------------------------------------------------------------ train / eval split


def select_split(cfg, split: str, bad: BadRows, *,
                 quiet: bool = False) -> tuple[list[RawPair], dict[str, Any]]:
    """Raw pairs of ``split`` ('train' or 'eval') and how they were chosen.

    Eval is carved from the train split's rows, by prompt (no prompt in both), when
    ``eval_split=''`` or when both splits would read the same rows
    (``same_rows_for_both_splits``) and ``eval_fraction > 0``; otherwise eval reads
    ``eval_split`` (its first ``eval_size`` pairs when > 0). ``max_pairs`` then caps each split.
    Returns ``(pairs, info)``; ``info['holdout']`` gives the carved sizes (None when eval has
    its own rows), also logged unless ``quiet``."""
    carve = not cfg.eval_split or (cfg.eval_fraction > 0 and same_rows_for_both_splits(cfg))
    split_name = cfg.train_split if (split == "train" or carve) else cfg.eval_split
    raw = load_raw_pairs(cfg, split_name, bad)
    where = cfg.path or cfg.source
    info: dict[str, Any] = {"dataset_split": split_name, "holdout": None}
    if carve:
        held = hold_out_prompts(raw, eval_size=cfg.eval_size, eval_fraction=cfg.eval_fraction,
                                seed=cfg.shuffle_seed, where=where)
        eval_pairs = [p for p in raw if prompt_key(p) in held]
        train_pairs = [p for p in raw if prompt_key(p) not in held]
        info["holdout"] = {
            "by": "eval_size" if cfg.eval_size > 0 else "eval_fraction",
            "eval_prompts": len(held), "prompts": len({prompt_key(p) for p in raw}),
            "eval_pairs": len(eval_pairs), "train_pairs": len(train_pairs)}
        # Asked for (eval_split='') it is reported; implied by one file serving both splits it
        # is a decision taken for the user (training loses those pairs even in a run that
        # never evaluates): a warning, and a note kept in the data summary.
        implicit = bool(cfg.eval_split)
        note = (f"eval holds out {len(held)} of {info['holdout']['prompts']} prompts of "
                f"{where} ({len(eval_pairs)} pairs, by {info['holdout']['by']}); train keeps "
                f"{len(train_pairs)} pairs")
        if implicit:
            note += (f": data.eval_split={cfg.eval_split!r} reads the same rows as "
                     f"data.train_split={cfg.train_split!r}, so eval is carved out of them "
                     f"(data.eval_fraction=0 trains on every pair)")
        info["holdout"]["note"] = note
        say = log.debug if quiet else (log.warning if implicit else log.info)
        say("data %s: %s", split, note)
        raw = eval_pairs if split == "eval" else train_pairs
    elif split == "eval" and cfg.eval_size > 0:
        raw = raw[: cfg.eval_size]
    if cfg.max_pairs:
        raw = raw[: cfg.max_pairs]
    return raw, info


def load_tokenised_pairs(cfg, split: str, tokenizer=None, *,
                         train_items: list | None = None) -> tuple[list[TokenPair], dict]:
    """Tokenised pairs of ``split`` ('train' or 'eval') and the stats of getting them.

    Every pair passed ``checks.check_scored_pair`` on its tokens as scored (bad rows raise
    ``DataError`` or, with ``on_bad_row='skip'``, are counted in ``stats['bad_rows_skipped']``
    by reason). Stats: ``lengths``, ``bad_rows_skipped``, ``tokenisation`` (text sources),
    ``split`` (text sources: the dataset split read and, when eval was carved by prompt, the
    sizes), and for eval ``eval_pairs_in_train`` / ``eval_prompts_in_train``: how many eval
    pairs (prompts) the train split also holds, compared as token ids
    (``checks.shared_items``), logged as a warning when pairs are shared. ``train_items``: the
    train split's tokenised items when the caller has them (else the train split is tokenised
    again for that count)."""
    cfg = config_lib.read_data(cfg)
    if cfg.format != "pairs":  # ranked lists / unpaired completions
        return load_tokenised_items(cfg, split, tokenizer, train_items=train_items)
    bad = BadRows(cfg.on_bad_row)
    stats: dict[str, Any] = {}
    if cfg.spec.tokenised:  # the synthetic task: token ids with a known reward
        pairs = _synthetic_pairs(cfg, split)[: cfg.max_pairs or None]
        too_long = [i for i, p in enumerate(pairs) if len(p["prompt"])
                    + max(len(p["chosen"]), len(p["rejected"])) > cfg.max_length]
        if too_long:
            raise DataError(f"{len(too_long)} {cfg.source} pairs exceed max_length "
                            f"{cfg.max_length}", file=cfg.source, row=too_long[0],
                            reason="prompt_too_long")
        kept = []
        for i, pair in enumerate(pairs):
            try:
                check_scored_pair(pair, end_ids=set(cfg.spec.end_ids), file=cfg.source, row=i)
                kept.append(pair)
            except DataError as e:
                bad.handle(e)
        pairs = kept
        if split == "eval":
            train = (train_items if train_items is not None
                     else _synthetic_pairs(cfg, "train")[: cfg.max_pairs or None])
            stats.update(overlap_stats(pairs, train))
    else:
        pairs, stats = encode_text_split(cfg, split, bad, tokenizer,
                                         lambda encoder, raw, bad: encoder.encode(raw, bad),
                                         train_items=train_items)
    if not pairs:
        raise DataError(f"no usable pairs in split {split!r}", file=cfg.path or cfg.source)
    warn_overlap(stats, len(pairs))
    stats["bad_rows_skipped"] = dict(bad.counts)
    stats["lengths"] = length_summary(pairs)
    return pairs, stats


def encode_text_split(cfg, split: str, bad: BadRows, tokenizer, encode, *,
                      train_items: list | None = None):
    """A text source's split, for every ``data.format``: its raw rows (``select_split``)
    tokenised by ``encode(encoder, raw, bad) -> (items, kept_at)`` with a ``PairTokenizer``
    over ``tokenizer`` (loaded from ``cfg.tokenizer`` when None), ``kept_at`` the raw index of
    each item. Returns ``(items, stats)``: ``split``, ``tokenisation`` and, for eval, the
    overlap with the train split as token ids (``overlap_stats``) against ``train_items``, or
    when None the train split tokenised here the same way (its bad rows skipped silently)."""
    stats: dict[str, Any] = {}
    raw, stats["split"] = select_split(cfg, split, bad)
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
    encoder = PairTokenizer(tok, cfg)
    items, _ = encode(encoder, raw, bad)
    stats["tokenisation"] = encoder.stats.as_dict()
    if split == "eval":
        if train_items is None:
            quiet = BadRows("skip", max_logged=0)
            train_raw, _ = select_split(cfg, "train", quiet, quiet=True)
            train_items, _ = encode(PairTokenizer(tok, cfg), train_raw, quiet)
        stats.update(overlap_stats(items, train_items))
    return items, stats


def load_mixture_pairs(cfg, split: str, tokenizer=None, *,
                       train_items: dict[str, list] | None = None
                       ) -> tuple[list[TokenPair], dict, list[tuple[str, float, int]]]:
    """``load_tokenised_pairs`` of every source of ``cfg.sources`` (``data.mixture``), their
    pairs concatenated in source order.

    Returns ``(pairs, stats, mixture)``: ``stats['sources']`` holds each source's own stats
    (``lengths`` those of all pairs), ``mixture`` is ``[(name, weight, pairs)]`` for
    ``PreferencePipeline``. ``train_items``: each source's train items by name, for eval's
    overlap count (``load_tokenised_pairs``). Raises ``ValueError`` for a bad ``data.sources``
    entry and ``DataError`` naming the source for a source without usable pairs."""
    cfg = config_lib.read_data(cfg)
    sources = cfg.sources
    if not sources:
        raise ValueError("data.sources is empty: load_tokenised_pairs reads the single source")
    tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
    pairs: list[TokenPair] = []
    per_source: dict[str, dict] = {}
    mixture = []
    for src in sources:
        try:
            items, stats = load_tokenised_pairs(src.cfg, split, tok,
                                                train_items=(train_items or {}).get(src.name))
        except DataError as e:
            raise DataError(f"mixture source {src.name!r}: {e}", reason=e.reason) from e
        pairs.extend(items)
        per_source[src.name] = stats
        mixture.append((src.name, src.weight, len(items)))
    log.info("data %s: mixture %s", split, {n: (w, k) for n, w, k in mixture})
    return pairs, {"sources": per_source, "lengths": length_summary(pairs)}, mixture


def build_pipeline(data_cfg, *, split: str, global_batch_size: int, process_index: int = 0,
                   process_count: int = 1, seed: int = 0, tokenizer=None,
                   pairs: list[TokenPair] | None = None, load_stats: dict | None = None,
                   reference: tuple[np.ndarray, np.ndarray] | None = None
                   ) -> PreferencePipeline:
    """The pipeline for ``split`` ('train' or 'eval'; the config maps them to dataset splits).

    ``pairs``: the split's tokenised pairs when the caller already has them (tokenise once,
    compute reference log-probs, then build; ``load_stats`` the stats that came with them);
    None loads them with ``load_tokenised_pairs``. ``tokenizer``: loaded from
    ``data_cfg.tokenizer`` when needed and not given (it gives the pad id). ``reference``: see
    ``PreferencePipeline``. With ``data.sources`` (and ``pairs`` None) the split is the
    mixture of those sources (``load_mixture_pairs``). Raises ``ValueError``/``DataError`` for
    a bad config or data."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    data_cfg = config_lib.read_data(data_cfg)
    mixed = data_cfg.mixed
    if not data_cfg.tokenised and tokenizer is None:
        tokenizer = load_tokenizer(data_cfg.tokenizer)
    mixture = None
    if pairs is None and mixed:
        pairs, load_stats, mixture = load_mixture_pairs(data_cfg, split, tokenizer)
    elif pairs is None:
        pairs, load_stats = load_tokenised_pairs(data_cfg, split, tokenizer)
    stats = dict(load_stats or {})
    log.info("data %s: %d pairs, lengths %s, skipped %s", split, len(pairs),
             stats.get("lengths", {}).get("total"), stats.get("bad_rows_skipped"))
    return pipeline_class(data_cfg)(pairs, data_cfg, train=split == "train",
                              global_batch_size=global_batch_size, process_index=process_index,
                              process_count=process_count, seed=seed, pad_id=pad_id_for(tokenizer),
                              load_stats=stats, reference=reference, mixture=mixture)


def _synthetic_items(cfg, split: str, fmt: str) -> list[Item]:
    s = cfg.synthetic
    task, n, seed = synthetic.split_draw(cfg, split)
    if fmt == "unpaired" and s.from_lists:
        return synthetic.labelled(synthetic.make_ranked(task, n, seed, int(s.num_responses)))
    if fmt == "unpaired":
        return unpair_tokens(synthetic.make_pairs(task, n, seed))
    return [{"prompt": it["prompt"], "responses": it["responses"], "scores": it["scores"]}
            for it in synthetic.make_ranked(task, n, seed, int(s.num_responses))]


def _synthetic_trees(cfg, split: str, bad: BadRows) -> list[dict]:
    """The synthetic conversations of ``split`` as preference trees (``data.format='trees'``,
    ``synthetic.conversation_branch_points``): a branch point at every turn, each checked as a
    ranked list (``ranked._checked_list``); a conversation with a bad branch point is dropped
    whole (``bad`` raises or counts). Weights: ``tree_depth_decay ** depth``. Raises DataError
    for a conversation longer than ``data.max_length`` at any branch point."""
    s = cfg.synthetic
    task, n, seed = synthetic.split_draw(cfg, split)
    convs = synthetic.make_conversations(task, n, seed, int(s.turns), int(s.turn_shift))
    out = []
    for i, conv in enumerate(convs[: cfg.max_pairs or None]):
        try:
            points = []
            for bp in synthetic.conversation_branch_points(conv):
                longest = len(bp["history"]) + max(map(len, bp["responses"]))
                if longest > cfg.max_length:
                    raise DataError(f"turn {bp['depth']} needs {longest} tokens > data.max_length "
                                    f"{cfg.max_length}", file=cfg.source, row=i,
                                    field=f"turns[{bp['depth']}]", reason="prompt_too_long")
                c = _checked_list(bp["history"], bp["responses"], [1.0, 0.0],
                                  end_ids=set(cfg.spec.end_ids), is_blank=None, file=cfg.source,
                                  row=i, fields=[f"turns[{bp['depth']}].chosen",
                                                 f"turns[{bp['depth']}].rejected"])
                points.append(BranchPoint(c["prompt"], list(c["responses"]),
                                          [int(r) for r in c["ranks"]],
                                          float(cfg.tree_depth_decay ** bp["depth"]),
                                          bp["depth"]))
            out.append({"branch_points": points})
        except DataError as e:
            bad.handle(e)
    return out


def _checked_synthetic(cfg, split: str, bad: BadRows) -> list[Item]:
    """The synthetic source's checked items of ``split`` (``data.format`` ranked / unpaired)."""
    items = []
    for i, it in enumerate(_synthetic_items(cfg, split, cfg.format)[: cfg.max_pairs or None]):
        try:
            if cfg.format == "unpaired":
                items.append(checked_unpaired(it, end_ids=set(cfg.spec.end_ids), is_blank=None,
                                              file=cfg.source, row=i))
            else:
                items.append(_checked_list(it["prompt"], it["responses"], list(it["scores"]),
                                           end_ids=set(cfg.spec.end_ids), is_blank=None,
                                           file=cfg.source, row=i))
        except DataError as e:
            bad.handle(e)
    return items


def load_tokenised_items(cfg, split: str, tokenizer=None, *,
                         train_items: list | None = None) -> tuple[list[Item], dict]:
    """``load_tokenised_pairs`` for ``data.format`` 'ranked' or 'unpaired': the split's
    tokenised items and the stats of getting them (``lengths``, ``bad_rows_skipped``,
    ``tokenisation`` and ``split`` for text sources, ``eval_pairs_in_train`` /
    ``eval_prompts_in_train`` for eval, compared as token ids against ``train_items`` or the
    train split tokenised again)."""
    cfg = config_lib.read_data(cfg)
    fmt = cfg.format
    bad = BadRows(cfg.on_bad_row)
    stats: dict[str, Any] = {}
    if fmt == "trees" and cfg.spec.tokenised:  # the synthetic conversations
        items = _synthetic_trees(cfg, split, bad)
    elif fmt == "trees":
        def encode(encoder, raw, bad):
            grouped = group_trees(raw)
            return encode_trees(encoder, grouped, bad, cfg.tree_depth_decay), None

        items, stats = encode_text_split(cfg, split, bad, tokenizer, encode,
                                         train_items=train_items)
    elif cfg.spec.tokenised:  # the synthetic task's lists
        items = _checked_synthetic(cfg, split, bad)
    else:
        def encode(encoder, raw, bad):
            built: list[Item] = []

            def check(prompt, responses, item):
                kw = {"end_ids": encoder.end_ids, "is_blank": encoder.is_blank,
                      "file": item.file, "row": item.row}
                if fmt == "unpaired":
                    out = checked_unpaired({"prompt": prompt, "completion": responses[0],
                                            "desirable": item.label}, **kw)
                else:
                    out = _checked_list(prompt, responses, item.scores, **kw)
                if item.weight != 1.0:
                    out["weight"] = np.asarray(item.weight, np.float32)
                built.append(out)

            _, kept_at = encoder.encode_lists(raw, bad, check)
            return built, kept_at

        items, stats = encode_text_split(cfg, split, bad, tokenizer, encode,
                                         train_items=train_items)
    if not items:
        raise DataError(f"no usable {fmt} items in split {split!r}", file=cfg.path or cfg.source)
    if cfg.spec.tokenised and split == "eval":
        if train_items is None:
            train_items = (_synthetic_trees if fmt == "trees" else _checked_synthetic)(
                cfg, "train", BadRows("skip", max_logged=0))
        stats.update(overlap_stats(items, train_items))
    warn_overlap(stats, len(items))
    stats["bad_rows_skipped"] = dict(bad.counts)
    stats["lengths"] = (branch_point_lengths(items) if fmt == "trees"
                        else length_summary(pair_views(items)))
    return items, stats


def pipeline_class(data_cfg) -> type[PreferencePipeline]:
    """The batch stream of ``data.format``: pairs, ranked lists or unpaired completions."""
    fmt = config_lib.read_data(data_cfg).format
    if fmt == "trees":
        return TreePipeline
    if fmt == "ranked":
        return RankedPipeline
    if fmt == "unpaired":
        return UnpairedPipeline
    return PreferencePipeline
