"""Tokenisation of preference pairs: what the model is trained on equals what it samples from.

Rules (docs/data.md, "Tokenisation rules", states them as guarantees):

* boundary (``split_at_prompt``, the one place it is decided, for every tokenizer family): the
  prompt tokens are the prompt tokenised alone (what a sampler feeds); a response's tokens are
  the tokens of the joined text (prompt + response, or the chat template's rendered
  conversation) that follow the prompt's tokens. A joined text whose tokens do not start with
  the prompt's tokens (the tokenizer merges across the boundary) is a bad row (``boundary``);
* trailing whitespace of a *text* prompt that tokenises apart from the prompt's text
  ('TL;DR: ' -> 'TL;DR:' + ' ', GPT-2 and SentencePiece alike) is left to the responses, where
  the tokenizer attaches it to the next word; whitespace that shares a token with prompt text
  (Llama-3's ':\\n') stays in the prompt;
* BOS: added when the tokenizer adds one to plain text (Llama-2/3 do, GPT-2 does not), never
  twice (a prompt or template that already starts with BOS keeps one);
* exactly one end token ends each response: the tokenizer's EOS for text pairs, the chat
  template's end-of-turn token for message pairs (EOS when the template closes the assistant
  turn with none). End tokens a response text already ends with are removed before it is
  joined or rendered (so 'Yes', 'Yes<eos>' and 'Yes<eos>\n' give the same tokens); the
  template's own closing token and whitespace after it give way to that one end token;
* chat messages: the prompt is rendered with ``add_generation_prompt=True``; the joined text is
  the rendered conversation with the assistant message (turn markers are learnt);
* a response text that starts with the template's assistant header after a prompt that already
  ends with it (``'<|im_start|>assistant\nMadrid'`` after ``...<|im_start|>assistant\n``) is a
  bad row (``doubled_assistant_header``): it would be trained with the header twice;
* one prompt path: ``prompt_ids`` gives a prompt's tokens (rendered or whitespace-moved text,
  then BOS) for training pairs, ranked lists and the prompts a sampler feeds
  (``encode_prompts``: prompt files of online DPO / PPO / evaluation); a sampler stops at
  ``stop_ids``, the end tokens appended to responses;
* truncation as the paper's code: if prompt + longer response > max_length, the prompt keeps
  max_prompt_length tokens (keep_end keeps its end, keep_start its start; BOS kept); if still
  too long the responses keep max_length - len(prompt) tokens;
* then ``checks.check_scored_pair`` decides, on the tokens as scored, whether the pair is kept.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np

from dpo_jax.data.checks import check_scored_pair
from dpo_jax.data.errors import BadRows, DataError
from dpo_jax.data.sources import RawPair

TokenPair = dict[str, np.ndarray]
_PROBE = "PROBE_RESPONSE_7f3a"  # assistant content used to find a template's end-of-turn token


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

    prompt_truncated: int = 0  # pairs whose prompt was cut to max_prompt_length
    responses_truncated: int = 0  # pairs whose responses were cut to fit max_length
    eos_already_present: int = 0  # response texts that already ended with an end token
    bos_already_present: int = 0  # prompts that already started with BOS (kept one)
    prompt_whitespace_moved: int = 0  # text prompts whose trailing whitespace went to responses
    chat_prefix_mismatch: int = 0  # responses whose template rendering changed the prompt text

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def split_at_prompt(prompt_ids: list[int], joined_ids: list[int]) -> list[int] | None:
    """The response tokens: ``joined_ids`` after ``prompt_ids``, or None when ``joined_ids`` does
    not start with ``prompt_ids`` (the tokenizer cannot split the joined text there)."""
    n = len(prompt_ids)
    return list(joined_ids[n:]) if list(joined_ids[:n]) == list(prompt_ids) else None


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
        self._ws_cache: dict[int, bool] = {}
        self._prompt_cache: dict[str, tuple[str, list[int], bool]] = {}
        # The token that closes the template's assistant turn (None: no template, or none).
        self.turn_end: int | None = self._template_turn_end()
        # Every token that ends a response; a sampler stops at any of them.
        self.end_ids: frozenset[int] = frozenset(
            {self.eos} | ({self.turn_end} if self.turn_end is not None else set()))
        self._end_texts = sorted({tokenizer.convert_ids_to_tokens(i) for i in self.end_ids},
                                 key=len, reverse=True)
        # What add_generation_prompt appends (ChatML '<|im_start|>assistant\n'); '' or None: none.
        self.assistant_header: str | None = self._template_header()
        self.stats = TokenStats()

    # -------------------------------------------------------------------------- pieces
    def is_blank(self, tid: int) -> bool:
        """Token ``tid`` decodes to whitespace only (or nothing)."""
        if tid not in self._ws_cache:
            self._ws_cache[tid] = self.tok.decode([tid]).strip() == ""
        return self._ws_cache[tid]

    def _is_special(self, tid: int) -> bool:
        added = getattr(self.tok, "added_tokens_decoder", {}) or {}
        return tid in set(self.tok.all_special_ids) or (tid in added and added[tid].special)

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(x) for x in self.tok(texts, add_special_tokens=False)["input_ids"]]

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False,
                                            add_generation_prompt=generation_prompt)

    def _render_probe(self, with_answer: bool) -> tuple[str, str] | None:
        """The chat template's rendering of a one-message user turn with the generation
        prompt, then of that turn without it (``with_answer``: followed by the assistant
        message ``_PROBE``); None without a template or when it refuses the conversation."""
        if not getattr(self.tok, "chat_template", None):
            return None
        user = [{"role": "user", "content": "hi"}]
        answer = [{"role": "assistant", "content": _PROBE}] if with_answer else []
        try:
            return self._render(user, True), self._render(user + answer, False)
        except Exception:  # a template that refuses this conversation
            return None

    def _template_turn_end(self) -> int | None:
        """The special token the chat template puts after an assistant message's content
        (ChatML '<|im_end|>', Llama-3 '<|eot_id|>', Llama-2/Mistral '</s>'), else None."""
        rendered = self._render_probe(with_answer=True)
        if rendered is None:  # no template, or no known turn end
            return None
        prompt, full = rendered
        if not full.startswith(prompt) or _PROBE not in full[len(prompt):]:
            return None
        after = self._ids([full[full.rindex(_PROBE) + len(_PROBE):]])[0]
        while after and self.is_blank(after[-1]) and not self._is_special(after[-1]):
            after = after[:-1]
        return int(after[-1]) if after and self._is_special(after[-1]) else None

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids a sampler stops at: every end token a response is given (``end_ids``), the
        template's turn end first (it ends chat responses), then EOS (text responses)."""
        first = () if self.turn_end is None else (self.turn_end,)
        return first + tuple(sorted(self.end_ids - set(first)))

    def _template_header(self) -> str | None:
        rendered = self._render_probe(with_answer=False)
        if rendered is None:
            return None
        gen, plain = rendered
        return gen[len(plain):] if gen.startswith(plain) else None

    def check_response_start(self, prompt: str | list[dict], text: str, *, field: str,
                             file: str | None, row: int | None) -> None:
        """Raise ``DataError`` (reason ``doubled_assistant_header``) when response ``text``
        starts with the template's assistant header although ``prompt`` (messages: rendered
        with the generation prompt, which ends with it; text: as given) already ends with it."""
        header = (self.assistant_header or "").strip()
        if not header or not text.lstrip().startswith(header):
            return
        ptext = self._render(prompt, True) if isinstance(prompt, list) else prompt
        if ptext.rstrip().endswith(header):
            raise DataError(
                f"the response starts with the chat template's assistant header {header!r} but "
                f"the prompt already ends with it: it would be trained with the header twice; "
                f"remove the header from the response", file=file, row=row, field=field,
                reason="doubled_assistant_header")

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

    def strip_end_text(self, text: str) -> str:
        """A response text without the end tokens it already ends with (and the whitespace
        after them), so every path renders and ends it the same way. Whitespace before them is
        content and stays."""
        cut = text
        while True:
            rest = cut.rstrip()
            end = next((e for e in self._end_texts if rest.endswith(e)), None)
            if end is None:
                if cut is not text:
                    self.stats.eos_already_present += 1
                return cut
            cut = rest[: len(rest) - len(end)]

    def finish_response(self, ids: list[int], chat: bool) -> list[int]:
        """``ids`` with exactly one end token: trailing end tokens (a template's, and whitespace
        after them) dropped, then the end token of the path appended (the template's turn end
        for chat, else EOS). Whitespace before the first trailing end token stays."""
        end = self.turn_end if chat and self.turn_end is not None else self.eos
        keep, j = len(ids), len(ids)
        while j > 0 and (ids[j - 1] in self.end_ids or self.is_blank(ids[j - 1])):
            if ids[j - 1] in self.end_ids:
                keep = j - 1
            j -= 1
        return list(ids[:keep]) + [end]

    def _cache_text_prompts(self, prompts: list[str]) -> None:
        """Fill the cache of ``_text_prompt`` for ``prompts`` with two batched tokenizer calls.
        Trailing whitespace is left out when it tokenises apart from the rest (the rest's ids
        are a prefix of the whole's): the tokenizer then attaches it to the response's first
        word. Whitespace sharing a token with prompt text stays."""
        todo = sorted({p for p in prompts if p not in self._prompt_cache})
        move = self.cfg.prompt_trailing_whitespace == "move"
        trailing = [p for p in todo if move and p.rstrip() != p]
        rests = dict(zip(trailing, self._ids([p.rstrip() for p in trailing])))
        for prompt, whole in zip(todo, self._ids(todo)):
            rest = rests.get(prompt)
            if rest is not None and whole[:len(rest)] == rest:
                self._prompt_cache[prompt] = (prompt.rstrip(), rest, True)
            else:
                self._prompt_cache[prompt] = (prompt, whole, False)

    def _text_prompt(self, prompt: str) -> tuple[str, list[int], bool]:
        """(text fed, raw ids without BOS, whether trailing whitespace was left out)."""
        self._cache_text_prompts([prompt])
        return self._prompt_cache[prompt]

    def raw_prompt_ids(self, prompts: list[str | list[dict]]) -> list[list[int]]:
        """Each prompt's tokens before BOS: a text prompt's with trailing whitespace moved
        (``_text_prompt``), a message list's generation-prompt rendering tokenised. Batched."""
        self._cache_text_prompts([p for p in prompts if not isinstance(p, list)])
        chat_at = [i for i, p in enumerate(prompts) if isinstance(p, list)]
        chat = dict(zip(chat_at, self._ids([self._render(prompts[i], True) for i in chat_at])))
        return [chat[i] if i in chat else list(self._text_prompt(p)[1])
                for i, p in enumerate(prompts)]

    def encode_prompts(self, prompts: list[str | list[dict]], where=(), bad: BadRows | None = None
                       ) -> list[list[int] | None]:
        """The prompts a sampler feeds: each prompt's tokens exactly as a training pair with
        that prompt gets them (``raw_prompt_ids`` then ``finish_prompt``: BOS once), cut to
        ``max_prompt_length`` as a too-long training prompt is (``cut_prompt``). ``where``: per
        prompt an object with ``file`` / ``row`` for errors; a prompt that 'error' truncation
        refuses raises ``DataError``, or is None when ``bad`` (skip mode) counts it."""
        out: list[list[int] | None] = []
        for i, raw in enumerate(self.raw_prompt_ids(prompts)):
            ids = self.finish_prompt(list(raw))
            try:
                if len(ids) > self.cfg.max_prompt_length:
                    ids = self.cut_prompt(ids, where[i] if i < len(where) else None,
                                          "a sampled prompt is cut as a training prompt")
            except DataError as e:
                if bad is None:
                    raise
                bad.handle(e)
                ids = None
            out.append(ids)
        return out

    def encode_prompt(self, prompt: str | list[dict]) -> list[int]:
        """One prompt's ids as fed at sample time and trained (BOS included when the tokenizer
        uses one), before truncation."""
        return self.finish_prompt(self.raw_prompt_ids([prompt])[0])

    def joined_texts(self, prompt: str | list[dict], responses: list[str]) -> list[str]:
        """The joined text of each response (prompt + response, or the rendered conversation):
        the boundary rules of the module doc for any number of responses."""
        responses = [self.strip_end_text(r) for r in responses]
        if not isinstance(prompt, list):
            self.stats.prompt_whitespace_moved += self._text_prompt(prompt)[2]
            return [prompt + r for r in responses]
        ptext = self._render(prompt, True)
        out = []
        for resp in responses:
            full = self._render(prompt + [{"role": "assistant", "content": resp}], False)
            if not full.startswith(ptext):  # history rendered differently once answered
                self.stats.chat_prefix_mismatch += 1
                full = ptext + resp
            out.append(full)
        return out

    # -------------------------------------------------------------------------- truncation
    def truncate(self, prompt: list[int], chosen: list[int], rejected: list[int],
                 pair: RawPair | None = None):
        """The paper's truncation, counted; 'error' mode refuses to cut a prompt."""
        prompt, (chosen, rejected) = self.truncate_responses(prompt, [chosen, rejected], pair)
        return prompt, chosen, rejected

    def truncate_responses(self, prompt: list[int], responses: list[list[int]], where=None
                           ) -> tuple[list[int], list[list[int]]]:
        """The paper's truncation with the longest of ``responses`` deciding (for pairs: the
        longer response); ``where`` (with ``file`` / ``row``) names the row in errors."""
        c = self.cfg
        longer = max(len(r) for r in responses)
        if len(prompt) + longer > c.max_length and len(prompt) > c.max_prompt_length:
            prompt = self.cut_prompt(prompt, where, "prompt + response exceeds max_length "
                                     f"{c.max_length}")
        if len(prompt) + longer > c.max_length:
            n = c.max_length - len(prompt)
            responses = [r[:n] for r in responses]
            self.stats.responses_truncated += 1
        return prompt, responses

    def cut_prompt(self, prompt: list[int], where, why: str) -> list[int]:
        """``prompt`` cut to ``max_prompt_length`` tokens by ``truncation_mode`` (BOS kept),
        counted; 'error' mode raises ``DataError`` (field ``prompt``, saying ``why``)."""
        c = self.cfg
        if c.truncation_mode == "error":
            raise DataError(
                f"prompt has {len(prompt)} tokens > max_prompt_length {c.max_prompt_length} "
                f"and {why}", file=getattr(where, "file", None),
                row=getattr(where, "row", None), field="prompt", reason="prompt_too_long")
        keep_bos = self.bos is not None and prompt[:1] == [self.bos]
        body, n = (prompt[1:], c.max_prompt_length - 1) if keep_bos else (prompt,
                                                                           c.max_prompt_length)
        body = body[-n:] if c.truncation_mode == "keep_end" else body[:n]
        self.stats.prompt_truncated += 1
        return ([self.bos] if keep_bos else []) + body

    # -------------------------------------------------------------------------- all pairs
    def _boundary_error(self, pair: RawPair, field: str, prompt: list[int],
                        joined: list[int]) -> DataError:
        n = len(prompt)
        shown = lambda ids: self.tok.convert_ids_to_tokens(list(ids))  # noqa: E731
        hint = ""
        if (not pair.is_chat and self.cfg.prompt_trailing_whitespace == "keep"
                and pair.prompt != pair.prompt.rstrip()):
            hint = " (data.prompt_trailing_whitespace='move' leaves trailing whitespace to it)"
        return DataError(
            f"the tokenizer cannot split prompt + {field} where the prompt ends: the prompt "
            f"alone ends with tokens {shown(prompt[max(0, n - 3):])} but the joined text has "
            f"{shown(joined[max(0, n - 3):n + 2])} there, so no response tokens follow the "
            f"prompt's tokens; end the prompt where a token of the joined text ends (move the "
            f"characters that merge across the boundary to one side){hint}",
            file=pair.file, row=pair.row, field=field, reason="boundary")

    def encode(self, pairs: list[RawPair], bad: BadRows) -> tuple[list[TokenPair], list[int]]:
        """Tokenised pairs and, for each, its index in ``pairs`` (bad rows raise or are
        counted by ``bad``). Tokenizer calls are batched."""
        raw_prompts = self.raw_prompt_ids([p.prompt for p in pairs])
        joined = [self.joined_texts(p.prompt, [p.chosen, p.rejected]) for p in pairs]
        ids = [self._ids([j[k] for j in joined]) for k in (0, 1)]

        def one(i: int, pair: RawPair) -> TokenPair:
            responses = self._responses(pair, raw_prompts[i], ("chosen", "rejected"),
                                        (pair.chosen, pair.rejected), (ids[0][i], ids[1][i]))
            prompt, chosen, rejected = self.truncate(self.finish_prompt(list(raw_prompts[i])),
                                                     *responses, pair)
            tokens = {k: np.asarray(v, np.int32) for k, v in
                      (("prompt", prompt), ("chosen", chosen), ("rejected", rejected))}
            if pair.weight != 1.0:  # data.weight_field; absent means 1
                tokens["weight"] = np.asarray(pair.weight, np.float32)
            check_scored_pair(tokens, end_ids=self.end_ids, is_blank=self.is_blank,
                              file=pair.file, row=pair.row)
            return tokens

        return bad.keep(pairs, one)

    def encode_lists(self, items: list, bad: BadRows, check=None
                     ) -> tuple[list[tuple[np.ndarray, list[np.ndarray]]], list[int]]:
        """Tokenised ``(prompt, [responses])`` of items with ``prompt``, ``responses`` (texts),
        ``is_chat``, ``file`` and ``row`` (ranked lists, unpaired completions), by the rules of
        pairs (boundary, BOS, one end token, truncation with the longest response deciding),
        and each kept item's index in ``items``. ``check(prompt, responses, item)`` raises
        ``DataError`` for an item that cannot be scored; bad rows raise or are counted by
        ``bad``."""
        raw_prompts = self.raw_prompt_ids([p.prompt for p in items])
        joined = [self.joined_texts(p.prompt, list(p.responses)) for p in items]
        flat = self._ids([t for j in joined for t in j])
        ends = np.cumsum([len(j) for j in joined]).tolist()

        def one(i: int, item) -> tuple[np.ndarray, list[np.ndarray]]:
            texts_ids = flat[ends[i] - len(joined[i]):ends[i]]
            fields = getattr(item, "fields", None) or [f"responses[{k}]"
                                                        for k in range(len(texts_ids))]
            responses = self._responses(item, raw_prompts[i], fields, item.responses, texts_ids)
            prompt, responses = self.truncate_responses(
                self.finish_prompt(list(raw_prompts[i])), responses, item)
            prompt = np.asarray(prompt, np.int32)
            responses = [np.asarray(r, np.int32) for r in responses]
            if check is not None:
                check(prompt, responses, item)
            return prompt, responses

        return bad.keep(items, one)

    def _responses(self, item, raw_prompt: list[int], fields, texts, joined_ids
                   ) -> list[list[int]]:
        """The response ids of ``item`` (a raw pair, list or unpaired row), one per ``fields``
        name, response text and ids of the prompt + response text joined: cut at the
        prompt's end (``split_at_prompt``) and finished (one end token). Raises DataError,
        naming the field, for a response that repeats the template's assistant header or a
        prompt end that the joined text's tokens cross."""
        responses = []
        for field, text, ids in zip(fields, texts, joined_ids):
            self.check_response_start(item.prompt, text, field=field, file=item.file,
                                      row=item.row)
            resp = split_at_prompt(raw_prompt, ids)
            if resp is None:
                raise self._boundary_error(item, field, raw_prompt, ids)
            responses.append(self.finish_response(resp, item.is_chat))
        return responses

    def __call__(self, pairs: list[RawPair], bad: BadRows) -> list[TokenPair]:
        """Tokenise all pairs (see ``encode``)."""
        return self.encode(pairs, bad)[0]


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
