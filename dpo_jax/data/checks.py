"""Checks on tokenised pairs as they are finally scored, and on whether they fit a model.

Two questions, each decided in one place:

* ``check_scored_pair``: can this pair teach a preference? Asked of the tokens after truncation,
  with the same rule for what is scored as ``batching.materialise`` (a token is scored when it is
  a response token and something precedes it in its sequence). Every bad-row decision that
  protects the loss is made here; the tokenizer and the synthetic source both call it.
* ``check_fits_model``: can the model embed and position every token? Asked once at start-up
  by the tasks, so a data/model mismatch is an error naming the config fields to change instead
  of NaN losses (``jnp.take`` returns NaN rows for out-of-range ids).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Collection, Sequence

import numpy as np

from dpo_jax.data.errors import DataError

log = logging.getLogger("dpo_jax.data")

TokenPair = dict[str, np.ndarray]
RESPONSES = ("chosen", "rejected")


def scored_tokens(prompt_length: int, response: np.ndarray) -> np.ndarray:
    """The response tokens the loss scores: all of them when the prompt has a token, else all
    but the first (position 0 of a sequence is never predicted; ``batching.materialise`` masks
    ``max(prompt_length, 1):``)."""
    return response if prompt_length > 0 else response[1:]


def check_scored_response(n_prompt: int, response: np.ndarray, *, ends: np.ndarray,
                          is_blank: Callable[[int], bool] | None, file: str | None,
                          row: int | None, field: str) -> np.ndarray:
    """The scored tokens of one response after ``n_prompt`` prompt tokens; raises the
    per-response ``DataError``s of ``check_scored_pair`` (``no_scored_tokens``,
    ``end_token_inside``, ``empty_response``) naming ``field``. ``ends``: sorted end ids."""
    tokens = scored_tokens(n_prompt, np.asarray(response))
    if len(tokens) == 0:
        raise DataError("the response has no scored token", file=file, row=row, field=field,
                        reason="no_scored_tokens")
    body = tokens[:-1] if ends.size and tokens[-1] in ends else tokens
    inside = np.isin(body, ends)
    if inside.any():
        raise DataError(
            f"end token {int(body[inside][0])} at response token {int(np.argmax(inside))} "
            "before the response's end: sampling stops there; remove it from the text",
            file=file, row=row, field=field, reason="end_token_inside")
    if len(body) == 0 or (is_blank is not None and all(is_blank(int(t)) for t in body)):
        raise DataError("empty response (no scored token but the end token, or only "
                        "whitespace)", file=file, row=row, field=field,
                        reason="empty_response")
    return tokens


def check_scored_pair(pair: TokenPair, *, end_ids: Collection[int] = (),
                      is_blank: Callable[[int], bool] | None = None, file: str | None = None,
                      row: int | None = None) -> None:
    """Raise ``DataError`` (with ``file``, ``row``, the field and a reason) when ``pair`` as
    finally scored cannot teach a preference; return None when it can.

    ``pair``: int32 ``prompt``, ``chosen``, ``rejected`` after truncation. ``end_ids``: the end
    tokens (EOS, a chat template's end-of-turn). ``is_blank(token_id)``: the token decodes to
    whitespace only (None: no token is blank). Reasons, in the order checked:

    * ``unscored_first_token`` (field ``prompt``): the prompt has no token (an empty prompt and a
      tokenizer that adds no BOS), so nothing predicts a response's first token;
    * ``no_scored_tokens``: a response has no scored token;
    * ``end_token_inside``: an end token before a response's last token (sampling would stop
      there);
    * ``empty_response``: a response's scored tokens other than its final end token are none or
      whitespace only;
    * ``identical_responses`` (field ``rejected``): the two responses' scored tokens are equal,
      e.g. after truncation cut the tokens where they differ.
    """
    ends = np.asarray(sorted(int(t) for t in end_ids), np.int64)
    n_prompt = len(pair["prompt"])
    if n_prompt == 0:
        raise DataError(
            "the prompt has no token, so nothing predicts the first response token and it is "
            "never scored: give the row a prompt, or start the prompt text with a context token "
            "such as the tokenizer's BOS (GPT-2: '<|endoftext|>')", file=file, row=row,
            field="prompt", reason="unscored_first_token")
    scored = {field: check_scored_response(n_prompt, pair[field], ends=ends, is_blank=is_blank,
                                           file=file, row=row, field=field)
              for field in RESPONSES}
    if np.array_equal(scored["chosen"], scored["rejected"]):
        raise DataError(
            f"chosen and rejected have the same {len(scored['chosen'])} scored tokens (identical "
            "responses, or truncation cut where they differ: raise data.max_length)",
            file=file, row=row, field="rejected", reason="identical_responses")


def check_fits_model(pairs: Sequence[TokenPair], *, vocab_size: int, max_positions: int | None,
                     pad_id: int, where: str, tokenizer_size: int | None = None) -> None:
    """Raise ``DataError`` naming the config fields to change when ``pairs`` cannot run through a
    model with ``vocab_size`` embedding rows and (learned positions) ``max_positions`` positions;
    return None when they can.

    ``pairs``: tokenised ``{prompt, chosen, rejected}`` int arrays (as batched: a sequence is
    prompt + one response, positions 0..len-1, also in packed rows). ``max_positions``: the
    learned position table's size (``ModelConfig.max_len`` with ``position='learned'``), None
    for rotary models (no table). ``pad_id``: the id written into padding. ``where``: names the
    data in the message (e.g. "train split of data.path='x.jsonl'"). ``tokenizer_size``:
    ``len(tokenizer)`` when known; a tokenizer that can emit ids beyond the embedding table is an
    error even if these pairs happen not to contain them (eval data and samples will).

    Reasons: ``pad_id_out_of_range``, ``token_id_out_of_range`` (negative ids included),
    ``tokenizer_larger_than_model``, ``sequence_too_long``.
    """
    vocab_fix = ("set model.overrides.vocab_size (or model.hf_path / model.preset) to a model "
                 "with more rows, or data.tokenizer to the model's own tokenizer "
                 "(data.synthetic.vocab_size for the synthetic source)")
    if not 0 <= int(pad_id) < vocab_size:
        raise DataError(
            f"{where}: pad id {pad_id} is outside the model's vocabulary [0, {vocab_size}): "
            f"{vocab_fix}; the pad id is data.tokenizer's pad token (else its EOS)",
            reason="pad_id_out_of_range")
    if tokenizer_size is not None and tokenizer_size > vocab_size:
        raise DataError(
            f"{where}: data.tokenizer has {tokenizer_size} tokens but the model embeds only "
            f"{vocab_size} (ids {vocab_size}..{tokenizer_size - 1}, e.g. added chat tokens, have "
            f"no embedding row): {vocab_fix}", reason="tokenizer_larger_than_model")
    fields = ("prompt",) + RESPONSES
    low_PF = np.asarray([[np.min(p[f], initial=0) for f in fields] for p in pairs],
                        np.int64).reshape(-1, len(fields))
    high_PF = np.asarray([[np.max(p[f], initial=0) for f in fields] for p in pairs],
                         np.int64).reshape(-1, len(fields))
    outside_PF = (low_PF < 0) | (high_PF >= vocab_size)
    if outside_PF.any():
        i, j = (int(k) for k in np.argwhere(outside_PF)[0])
        ids = np.asarray(pairs[i][fields[j]])
        first = int(ids[(ids < 0) | (ids >= vocab_size)][0])
        raise DataError(
            f"{where}: pair {i} field {fields[j]!r} has token id {first} outside the model's "
            f"vocabulary [0, {vocab_size}) ({int(outside_PF.sum())} fields affected; ids span "
            f"{int(low_PF.min())}..{int(high_PF.max())}): {vocab_fix}",
            reason="token_id_out_of_range")
    if max_positions is not None and len(pairs):
        length_P = np.asarray([len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"]))
                               for p in pairs])
        i = int(np.argmax(length_P))
        if length_P[i] > max_positions:
            raise DataError(
                f"{where}: pair {i} is {int(length_P[i])} tokens long (prompt + longer response; "
                f"{int((length_P > max_positions).sum())} pairs too long) but the model's learned "
                f"position table has {max_positions} positions: set data.max_length <= "
                f"{max_positions} (and data.max_prompt_length below it), or use a model with a "
                f"longer table (model.overrides.max_len / model.hf_path / model.preset)",
                reason="sequence_too_long")


def _token_key(value: Any) -> tuple:
    """Hashable exact form of a token array (or a list of them) or a label."""
    if isinstance(value, (list, tuple)):
        return tuple(_token_key(v) for v in value)
    a = np.asarray(value)
    if a.dtype.kind in "iu":
        a = a.astype(np.int64)
    return (a.dtype.str, a.shape, a.tobytes())


def item_token_key(item: dict) -> tuple:
    """What an item trains and scores, exactly: its prompt and response token ids after
    truncation and the target they carry (a pair's chosen / rejected order, a ranked list's
    ranks, an unpaired completion's label); its weight is not part of it."""
    return tuple((k, _token_key(item[k])) for k in sorted(item) if k != "weight")


def shared_items(eval_items: Sequence[dict], train_items: Sequence[dict]) -> tuple[int, int]:
    """``(eval items that are also train items, distinct eval prompts that are also train
    prompts)``, both compared as tokens (``item_token_key``; prompts as their token ids), so
    texts that differ only where the tokenizer does not (whitespace moved across the prompt /
    response boundary, a template's spacing) count as the same. Items: tokenised pairs,
    ranked lists or unpaired completions."""
    train_keys = {item_token_key(it) for it in train_items}
    train_prompts = {_token_key(it["prompt"]) for it in train_items}
    pairs = sum(item_token_key(it) in train_keys for it in eval_items)
    prompts = len({_token_key(it["prompt"]) for it in eval_items} & train_prompts)
    return pairs, prompts


def _branch_point_views(items: list) -> list:
    """Preference trees (``{"branch_points": [...]}``, ``data/tree_data.py``) as one ranked-list
    view per branch point (history as the prompt); other items as they are."""
    return [view for it in items for view in (
        [{"prompt": bp.history, "responses": list(bp.responses)} for bp in it["branch_points"]]
        if isinstance(it, dict) and "branch_points" in it else [it])]


def overlap_stats(eval_items: list, train_items: list) -> dict[str, int]:
    """``eval_pairs_in_train`` / ``eval_prompts_in_train`` of ``checks.shared_items`` (trees:
    counted per branch point)."""
    shared, prompts = shared_items(_branch_point_views(eval_items),
                                   _branch_point_views(train_items))
    return {"eval_pairs_in_train": shared, "eval_prompts_in_train": prompts}


def warn_overlap(stats: dict, num_eval: int) -> None:
    """Log a warning when ``stats`` say eval items are train items."""
    if stats.get("eval_pairs_in_train"):
        log.warning(
            "eval shares %d of its %d pairs with the train split (%d prompts in both; compared "
            "as token ids): eval metrics partly measure training pairs. Hold out prompts "
            "instead: data.eval_fraction > 0 when one file serves both splits, "
            "data.eval_split='' to carve eval from train, or (synthetic) "
            "data.synthetic.eval_seed != train_seed",
            stats["eval_pairs_in_train"], num_eval, stats["eval_prompts_in_train"])
