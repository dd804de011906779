"""Schema parsers: rows of each public preference dataset -> ``RawPair`` (text or messages).

Each parser reproduces how the DPO paper's code (``preference_datasets.py``) splits prompt from
responses, so results are comparable; rows that cannot be parsed raise ``DataError`` naming the
file, row and field (or are counted and skipped with ``on_bad_row='skip'``). ``select_split``
decides which rows are train and which eval (held out by prompt when one set of rows serves
both).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import pathlib
import re
from typing import Any, Callable

import numpy as np

from dpo_jax.data.errors import DataError
from dpo_jax.data.io import Record

log = logging.getLogger("dpo_jax.data")
Message = dict[str, str]
HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"


@dataclasses.dataclass
class RawPair:
    """One preference pair before tokenisation.

    ``prompt`` is text (responses continue it directly), or a list of chat messages ending before
    the assistant turn (then ``chosen``/``rejected`` are assistant message contents and the
    tokenizer's chat template renders them).
    """

    prompt: str | list[Message]
    chosen: str
    rejected: str
    file: str = ""
    row: int = -1
    weight: float = 1.0  # from ``data.weight_field`` (1 when unset)

    @property
    def is_chat(self) -> bool:
        return isinstance(self.prompt, list)


def _get(rec: Record, field: str, file: str, row: int) -> Any:
    if field not in rec or rec[field] is None:
        raise DataError(f"missing column (row has {sorted(rec)})", file=file, row=row,
                        field=field, reason="missing_field")
    return rec[field]


def _get_str(rec: Record, field: str, file: str, row: int) -> str:
    v = _get(rec, field, file, row)
    if not isinstance(v, str):
        raise DataError(f"expected a string, got {type(v).__name__}", file=file, row=row,
                        field=field, reason="bad_type")
    return v


# ----------------------------------------------------------------------------------------- hh

def split_prompt_and_responses(chosen: str, rejected: str, file: str = "", row: int = -1):
    """HH: the prompt is the chosen text through its last '\\n\\nAssistant:' (paper's code);
    both responses are what follows it. The rejected text must share that prompt."""
    idx = chosen.rfind(HH_ASSISTANT)
    if idx < 0:
        raise DataError(f"no {HH_ASSISTANT!r} turn", file=file, row=row, field="chosen",
                        reason="bad_format")
    prompt = chosen[: idx + len(HH_ASSISTANT)]
    if not rejected.startswith(prompt):
        raise DataError("rejected does not start with the chosen prompt", file=file, row=row,
                        field="rejected", reason="prompt_mismatch")
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def hh_messages(prompt: str, file: str = "", row: int = -1) -> list[Message]:
    """An HH prompt ('\n\nHuman: ... \n\nAssistant: ... \n\nAssistant:') as chat messages:
    each Human turn a ``user`` message, each Assistant turn an ``assistant`` message, contents
    stripped, the final empty Assistant turn dropped (the chat template's generation prompt
    stands for it). Raises DataError (field 'chosen') when the dialogue does not start with a
    Human turn or a turn is empty."""
    pieces = re.split(r"(\n\nHuman:|\n\nAssistant:)", prompt)
    if pieces[0].strip() or len(pieces) < 3 or pieces[1] != HH_HUMAN:
        raise DataError("the dialogue does not start with a '\\n\\nHuman:' turn", file=file,
                        row=row, field="chosen", reason="bad_format")
    messages = []
    for marker, text in zip(pieces[1::2], pieces[2::2]):
        messages.append({"role": "user" if marker == HH_HUMAN else "assistant",
                         "content": text.strip()})
    if messages[-1] != {"role": "assistant", "content": ""} or any(
            not m["content"] for m in messages[:-1]):
        raise DataError("an empty turn inside the dialogue", file=file, row=row, field="chosen",
                        reason="bad_format")
    return messages[:-1]


def parse_hh(rec: Record, file: str, row: int, cfg) -> RawPair | None:
    """HH pairs as the paper's code splits them; with ``data.hh_chat`` the prompt becomes chat
    messages (:func:`hh_messages`) and the responses assistant contents (stripped), rendered by
    the tokenizer's chat template, as a chat model is prompted."""
    prompt, c, r = split_prompt_and_responses(
        _get_str(rec, "chosen", file, row), _get_str(rec, "rejected", file, row), file, row)
    if cfg.hh_single_turn and prompt.count(HH_HUMAN) != 1:
        return None  # not a bad row: a filter
    if cfg.hh_chat:
        c, r = c.strip(), r.strip()
        for field, text in (("chosen", c), ("rejected", r)):
            if not text:
                raise DataError("empty assistant response", file=file, row=row, field=field,
                                reason="empty_response")
        return RawPair(hh_messages(prompt, file, row), c, r, file, row)
    return RawPair(prompt, c, r, file, row)


# ---------------------------------------------------------------------------------------- shp

def parse_shp(rec: Record, file: str, row: int, cfg) -> RawPair | None:
    """SHP: prompt '\\n\\nHuman: <history>\\n\\nAssistant:', responses ' ' + human_ref_A/B;
    labels == 1 means A is preferred. Pairs with score_ratio < shp_min_score_ratio are dropped
    (the paper keeps ratio >= 2); the per-post cap is applied after all rows are read."""
    history = _get_str(rec, "history", file, row)
    a, b = _get_str(rec, "human_ref_A", file, row), _get_str(rec, "human_ref_B", file, row)
    label = _get(rec, "labels", file, row)
    if "score_ratio" in rec and rec["score_ratio"] is not None:
        ratio = float(rec["score_ratio"])
    else:
        sa, sb = float(_get(rec, "score_A", file, row)), float(_get(rec, "score_B", file, row))
        ratio = max(sa / max(sb, 1e-9), sb / max(sa, 1e-9))
    if ratio < cfg.shp_min_score_ratio:
        return None
    prompt = f"{HH_HUMAN} {history}{HH_ASSISTANT}"
    chosen, rejected = (a, b) if int(label) == 1 else (b, a)
    return RawPair(prompt, " " + chosen, " " + rejected, file, row)


def _cap_per_prompt(pairs: list[RawPair], cap: int) -> list[RawPair]:
    if cap <= 0:
        return pairs
    seen: collections.Counter[str] = collections.Counter()
    out = []
    for p in pairs:
        key = p.prompt if isinstance(p.prompt, str) else repr(p.prompt)
        if seen[key] < cap:
            out.append(p)
        seen[key] += 1
    return out


# --------------------------------------------------------------------------------------- tldr

def tldr_prompt(info: dict) -> str:
    """The paper's TL;DR prompt: 'SUBREDDIT: r/...\\nTITLE: ...\\nPOST: ...\\nTL;DR:'."""
    return (f"SUBREDDIT: r/{info.get('subreddit') or ''}\nTITLE: {info.get('title') or ''}\n"
            f"POST: {info.get('post') or ''}\nTL;DR:")


def parse_tldr(rec: Record, file: str, row: int, cfg) -> RawPair:
    info = _get(rec, "info", file, row)
    if not isinstance(info, dict) or not info.get("post"):
        raise DataError("info.post missing (CNN/DM rows have no post)", file=file, row=row,
                        field="info", reason="missing_field")
    summaries = _get(rec, "summaries", file, row)
    if not isinstance(summaries, list) or len(summaries) != 2:
        raise DataError("expected two summaries", file=file, row=row, field="summaries",
                        reason="bad_format")
    choice = int(_get(rec, "choice", file, row))
    texts = [" " + (s.get("text") or "").strip() if isinstance(s, dict) else "" for s in summaries]
    return RawPair(tldr_prompt(info), texts[choice], texts[1 - choice], file, row)


# ------------------------------------------------------------------------ messages / generic

def _messages(v: Any, file: str, row: int, field: str) -> list[Message]:
    if not isinstance(v, list) or not all(
        isinstance(m, dict) and "role" in m and "content" in m for m in v
    ):
        raise DataError("expected a list of {role, content} messages", file=file, row=row,
                        field=field, reason="bad_type")
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in v]


def _split_conversation(prompt_msgs: list[Message] | None, conv: list[Message], file: str,
                        row: int, field: str) -> tuple[list[Message], str]:
    """Prompt messages and the final assistant content of one side."""
    if prompt_msgs is not None and conv[: len(prompt_msgs)] == prompt_msgs:
        conv_prompt, rest = prompt_msgs, conv[len(prompt_msgs):]
    elif prompt_msgs is not None:
        conv_prompt, rest = prompt_msgs, conv
    else:
        conv_prompt, rest = conv[:-1], conv[-1:]
    if len(rest) != 1 or rest[0]["role"] != "assistant":
        raise DataError("the response must be exactly one final assistant message", file=file,
                        row=row, field=field, reason="bad_format")
    return conv_prompt, rest[0]["content"]


def parse_messages(prompt: Any, chosen: Any, rejected: Any, file: str, row: int,
                   fields: tuple[str, str, str]) -> RawPair:
    """Message-list pairs (ultrafeedback, TRL conversational): the prompt is the shared prefix."""
    fp, fc, fr = fields
    if isinstance(prompt, str):
        prompt_msgs: list[Message] | None = [{"role": "user", "content": prompt}]
    elif prompt is None:
        prompt_msgs = None
    else:
        prompt_msgs = _messages(prompt, file, row, fp)
    c_msgs, r_msgs = _messages(chosen, file, row, fc), _messages(rejected, file, row, fr)
    pc, c = _split_conversation(prompt_msgs, c_msgs, file, row, fc)
    pr, r = _split_conversation(prompt_msgs, r_msgs, file, row, fr)
    if pc != pr:
        raise DataError("chosen and rejected conversations have different prompts", file=file,
                        row=row, field=fr, reason="prompt_mismatch")
    if not pc:
        raise DataError("empty prompt conversation", file=file, row=row, field=fp,
                        reason="bad_format")
    return RawPair(pc, c, r, file, row)


def parse_ultrafeedback(rec: Record, file: str, row: int, cfg) -> RawPair:
    return parse_messages(rec.get("prompt"), _get(rec, "chosen", file, row),
                          _get(rec, "rejected", file, row), file, row,
                          ("prompt", "chosen", "rejected"))


def parse_generic(rec: Record, file: str, row: int, cfg) -> RawPair:
    """prompt/chosen/rejected as strings, or as message lists (prompt column optional)."""
    fp, fc, fr = cfg.field_prompt, cfg.field_chosen, cfg.field_rejected
    chosen, rejected = _get(rec, fc, file, row), _get(rec, fr, file, row)
    if isinstance(chosen, str) and isinstance(rejected, str):
        return RawPair(_get_str(rec, fp, file, row), chosen, rejected, file, row)
    return parse_messages(rec.get(fp), chosen, rejected, file, row, (fp, fc, fr))


PARSERS: dict[str, Callable[..., RawPair | None]] = {
    "hh": parse_hh, "shp": parse_shp, "tldr": parse_tldr,
    "ultrafeedback": parse_ultrafeedback, "generic": parse_generic,
}
HUB_NAMES = {
    "hh": "Anthropic/hh-rlhf", "shp": "stanfordnlp/SHP", "tldr": "openai/summarize_from_feedback",
    "ultrafeedback": "HuggingFaceH4/ultrafeedback_binarized",
    "se": "HuggingFaceH4/stack-exchange-preferences",
}


def pair_weight(rec: Record, field: str, file: str, row: int) -> float:
    """The row's ``data.weight_field`` value as a pair weight: a finite number >= 0 (bools and
    numeric strings are refused, so a wrong column is not read as weights)."""
    v = _get(rec, field, file, row)
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise DataError(f"pair weight must be a number, got {type(v).__name__} {v!r}", file=file,
                        row=row, field=field, reason="bad_weight")
    w = float(v)
    if not np.isfinite(w) or w < 0:
        raise DataError(f"pair weight must be finite and >= 0, got {w}", file=file, row=row,
                        field=field, reason="bad_weight")
    return w


def prompt_key(pair: RawPair) -> str:
    """The prompt as one string (text and message-list prompts never collide); a preference
    tree's branch points give their tree's root prompt (``group_key``), so a tree is held out
    whole."""
    return getattr(pair, "group_key", "") or json.dumps(pair.prompt)


def same_rows_for_both_splits(cfg) -> bool:
    """True when ``train_split`` and ``eval_split`` read the same rows: one file (the file *is*
    the split), a ``save_to_disk`` Dataset without splits, or equal split names."""
    if cfg.train_split == cfg.eval_split:
        return True
    if cfg.source == "se" and {cfg.train_split, cfg.eval_split} == {"train", "test"}:
        return False  # the paper's disjoint split of the dataset's rows (stackexchange.py)
    path = pathlib.Path(cfg.path) if cfg.path else None
    if path is None or not path.exists():
        return False
    if path.is_file():
        return True
    saved = any((path / n).exists() for n in ("state.json", "dataset_info.json"))
    return saved and not (path / "dataset_dict.json").exists()


def hold_out_prompts(pairs: list[RawPair], *, eval_size: int, eval_fraction: float,
                     seed: int, where: str) -> set[str]:
    """Prompt keys held out for eval, chosen in a seeded order of the distinct prompts: the
    fewest whose pairs reach ``eval_size`` when it is > 0, else ``eval_fraction`` of them
    (at least one). Raises ``DataError`` when no prompt would be left for training."""
    prompts = list(dict.fromkeys(prompt_key(p) for p in pairs))
    order = np.random.default_rng([int(seed), 7919]).permutation(len(prompts))
    if eval_size > 0:
        per_prompt = collections.Counter(prompt_key(p) for p in pairs)
        held: list[str] = []
        total = 0
        for i in order:
            if total >= eval_size:
                break
            held.append(prompts[i])
            total += per_prompt[prompts[i]]
    else:
        held = [prompts[i] for i in order[:max(1, round(eval_fraction * len(prompts)))]]
    if len(held) >= len(prompts):
        rule = (f"data.eval_size={eval_size}" if eval_size > 0
                else f"data.eval_fraction={eval_fraction}")
        raise DataError(
            f"holding out prompts for eval ({rule}) leaves none for training: the {len(pairs)} "
            f"pairs have {len(prompts)} distinct prompt(s). Lower the held-out size, give eval "
            f"its own rows (data.eval_split naming a split of data.path), or evaluate on training "
            f"pairs with data.eval_fraction=0 (reported as eval_pairs_in_train)", file=where,
            reason="no_train_prompts")
    return set(held)
