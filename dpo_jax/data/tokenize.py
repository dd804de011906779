"""Tokenisation of preference pairs: what the model is trained on equals what it samples from.

Rules (see docs/data.md for the reasoning):

* the prompt is tokenised alone and the responses alone, then concatenated: the prompt tokens are
  exactly the tokens a sampler feeds, and a response is the continuation the model generates;
* boundary: trailing whitespace of a *text* prompt moves to the start of each response before
  tokenising ('TL;DR: ' + 'x' -> 'TL;DR:' + ' x'), because BPE tokenizers attach a leading
  space to the next word; then prompt + response ids equal the ids of the joined text in the
  usual case (tested), and never decode to a different string;
* BOS: added when the tokenizer adds one to plain text (Llama-3 does, GPT-2 does not), never
  twice (a prompt or template that already starts with BOS keeps one);
* EOS: appended once to each response; not added when the response (e.g. a chat template's
  assistant turn) already ends with it, and whitespace the template puts after it is dropped;
* chat messages: the prompt is rendered with ``add_generation_prompt=True``; a response is the
  rendered full conversation minus the rendered prompt (so turn-end tokens are learnt);
* truncation as the paper's code: if prompt + longer response > max_length, the prompt keeps
  max_prompt_length tokens (keep_end keeps its end, keep_start its start; BOS kept); if still
  too long the responses keep max_length - max_prompt_length tokens.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np

from dpo_jax.data.errors import BadRows, DataError
from dpo_jax.data.sources import RawPair

TokenPair = dict[str, np.ndarray]


def load_tokenizer(name_or_path: str):
    """A ``transformers`` tokenizer from a local directory or hub name, with a pad token.

    The pad token defaults to EOS; the pipeline never derives masks from pad ids."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as e:
        raise DataError(f"cannot load tokenizer: {e}", file=name_or_path,
                        reason="unreadable") from e
    if tok.eos_token_id is None:
        raise DataError("tokenizer has no eos token", file=name_or_path, reason="bad_tokenizer")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


@dataclasses.dataclass
class TokenStats:
    """Counts of what tokenisation changed, reported with the pipeline stats."""

    prompt_truncated: int = 0
    responses_truncated: int = 0
    eos_already_present: int = 0
    bos_already_present: int = 0
    chat_prefix_mismatch: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def _split_trailing_ws(text: str) -> tuple[str, str]:
    stripped = text.rstrip()
    return stripped, text[len(stripped):]


class PairTokenizer:
    """Turns ``RawPair``s into int32 ``{prompt, chosen, rejected}`` with EOS and truncation."""

    def __init__(self, tokenizer, cfg):
        self.tok = tokenizer
        self.cfg = cfg
        self.eos = int(tokenizer.eos_token_id)
        bos = tokenizer.bos_token_id
        empty = tokenizer("", add_special_tokens=True)["input_ids"]
        # BOS is added only when the tokenizer itself prepends it to plain text.
        self.bos: int | None = int(bos) if bos is not None and empty[:1] == [bos] else None
        self.stats = TokenStats()
        self._ws_cache: dict[int, bool] = {}

    # -------------------------------------------------------------------------- pieces
    def _is_ws(self, tid: int) -> bool:
        if tid not in self._ws_cache:
            self._ws_cache[tid] = self.tok.decode([tid]).strip() == ""
        return self._ws_cache[tid]

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(x) for x in self.tok(texts, add_special_tokens=False)["input_ids"]]

    def finish_prompt(self, ids: list[int]) -> list[int]:
        """Add BOS when the tokenizer uses one; keep a single BOS if the text brought its own."""
        if self.bos is None:
            return ids
        if ids[:1] == [self.bos]:
            self.stats.bos_already_present += 1
            while ids[1:2] == [self.bos]:
                ids = ids[1:]
            return ids
        return [self.bos] + ids

    def finish_response(self, ids: list[int]) -> list[int]:
        """Exactly one EOS at the end (template whitespace after an existing EOS dropped)."""
        end = len(ids)
        while end > 0 and ids[end - 1] != self.eos and self._is_ws(ids[end - 1]):
            end -= 1
        if end > 0 and ids[end - 1] == self.eos:
            self.stats.eos_already_present += 1
            return ids[:end]
        return ids + [self.eos]

    def prompt_text(self, prompt: str | list[dict]) -> str:
        """The prompt string a sampler should tokenise (chat rendered, whitespace moved)."""
        if isinstance(prompt, list):
            return self.tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        if self.cfg.prompt_trailing_whitespace == "move":
            return _split_trailing_ws(prompt)[0]
        return prompt

    def encode_prompt(self, prompt: str | list[dict]) -> list[int]:
        """Prompt ids as fed at sample time."""
        return self.finish_prompt(self._ids([self.prompt_text(prompt)])[0])

    def _texts(self, pair: RawPair) -> tuple[str, str, str]:
        if pair.is_chat:
            ptext = self.prompt_text(pair.prompt)
            out = []
            for resp in (pair.chosen, pair.rejected):
                full = self.tok.apply_chat_template(
                    pair.prompt + [{"role": "assistant", "content": resp}], tokenize=False)
                if full.startswith(ptext):
                    out.append(full[len(ptext):])
                else:  # template renders history differently once answered: plain content
                    self.stats.chat_prefix_mismatch += 1
                    out.append(resp)
            return ptext, out[0], out[1]
        if self.cfg.prompt_trailing_whitespace == "move":
            ptext, ws = _split_trailing_ws(pair.prompt)
            return ptext, ws + pair.chosen, ws + pair.rejected
        return pair.prompt, pair.chosen, pair.rejected

    # -------------------------------------------------------------------------- truncation
    def truncate(self, prompt: list[int], chosen: list[int], rejected: list[int],
                 pair: RawPair | None = None):
        """The paper's truncation, counted; 'error' mode refuses to cut a prompt."""
        c = self.cfg
        longer = max(len(chosen), len(rejected))
        if len(prompt) + longer > c.max_length and len(prompt) > c.max_prompt_length:
            if c.truncation_mode == "error":
                raise DataError(
                    f"prompt has {len(prompt)} tokens > max_prompt_length {c.max_prompt_length}"
                    f" and prompt + response exceeds max_length {c.max_length}",
                    file=pair.file if pair else None, row=pair.row if pair else None,
                    field="prompt", reason="prompt_too_long")
            keep_bos = self.bos is not None and prompt[:1] == [self.bos]
            body, n = (prompt[1:], c.max_prompt_length - 1) if keep_bos else (prompt,
                                                                               c.max_prompt_length)
            body = body[-n:] if c.truncation_mode == "keep_end" else body[:n]
            prompt = ([self.bos] if keep_bos else []) + body
            self.stats.prompt_truncated += 1
        if len(prompt) + longer > c.max_length:
            n = c.max_length - len(prompt)
            chosen, rejected = chosen[:n], rejected[:n]
            self.stats.responses_truncated += 1
        return prompt, chosen, rejected

    # -------------------------------------------------------------------------- all pairs
    def __call__(self, pairs: list[RawPair], bad: BadRows) -> list[TokenPair]:
        """Tokenise all pairs (batched tokenizer calls, which are much faster)."""
        texts = [self._texts(p) for p in pairs]
        ids = [self._ids([t[k] for t in texts]) for k in range(3)]
        out: list[TokenPair] = []
        for i, pair in enumerate(pairs):
            try:
                prompt = self.finish_prompt(ids[0][i])
                chosen, rejected = self.finish_response(ids[1][i]), self.finish_response(ids[2][i])
                if chosen == rejected:
                    raise DataError("chosen and rejected tokenise identically", file=pair.file,
                                    row=pair.row, field="rejected", reason="identical_responses")
                prompt, chosen, rejected = self.truncate(prompt, chosen, rejected, pair)
                out.append({k: np.asarray(v, np.int32) for k, v in
                            (("prompt", prompt), ("chosen", chosen), ("rejected", rejected))})
            except DataError as e:
                bad.handle(e)
        return out


def length_summary(pairs: list[TokenPair]) -> dict[str, Any]:
    """Mean / p50 / p90 / max of prompt, response and total lengths."""
    out: dict[str, Any] = {}
    if not pairs:
        return out
    cols = collections.OrderedDict(
        prompt=[len(p["prompt"]) for p in pairs],
        chosen=[len(p["chosen"]) for p in pairs],
        rejected=[len(p["rejected"]) for p in pairs],
        total=[len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) for p in pairs])
    for k, v in cols.items():
        a = np.asarray(v)
        out[k] = {"mean": float(a.mean()), "p50": int(np.percentile(a, 50)),
                  "p90": int(np.percentile(a, 90)), "max": int(a.max())}
    return out
