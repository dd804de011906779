"""Prompts and stop tokens for sampling (online DPO, PPO rollouts, evaluation samples): from a
prompt file or the prompts of the run's preference data.

A prompt file is jsonl(.gz), one row per prompt, with ``prompt_ids`` (token ids, used as given
except for the cut to ``data.max_prompt_length`` keeping the end: the IMDb experiment's
``make_prompts.py`` writes these) or ``prompt`` (text, or a list of chat messages). A ``prompt``
is tokenised by the pair tokenizer's prompt path (``PairTokenizer.encode_prompts``): the tokens
equal the ``prompt`` tokens of a training pair with that prompt (BOS as the tokenizer adds it,
trailing whitespace moved as ``data.prompt_trailing_whitespace`` says, messages rendered with
the generation prompt), cut to ``data.max_prompt_length`` as a too-long training prompt is.
Without a file, the distinct prompts of ``config.data``'s split are used (e.g. the synthetic
task). A sampler stops at :func:`stop_ids`, the end tokens those pairs' responses end with.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from dpo_jax.data import io
from dpo_jax.data.config import default_data_config, read_data
from dpo_jax.data.errors import BadRows, DataError
from dpo_jax.data.loading import load_tokenised_pairs
from dpo_jax.data.stream import BatchStream
from dpo_jax.data.tokenize import PairTokenizer, load_tokenizer


@functools.lru_cache(maxsize=16)
def _tokenizer_stop_ids(name: str) -> tuple[int, ...]:
    return PairTokenizer(load_tokenizer(name), default_data_config()).stop_ids


def stop_ids(data_cfg, override: Sequence[int] = ()) -> tuple[int, ...]:
    """The token ids a sampler stops at for data ``data_cfg``: ``override`` when non-empty
    (a config's ``eval.stop_ids`` / ``online.stop_ids`` / ``ppo.stop_ids``), else the end tokens
    the pair tokenizer appends to responses (``PairTokenizer.stop_ids``: ``data.tokenizer``'s
    chat-template turn end, e.g. ChatML '<|im_end|>' or Llama-3 '<|eot_id|>', then its EOS),
    else for the synthetic source its EOS (0). Raises ``DataError`` when the tokenizer cannot be
    loaded or the override holds a negative id."""
    if isinstance(override, int):
        override = (override,)
    ids = tuple(int(t) for t in override)
    if any(t < 0 for t in ids):
        raise DataError(f"stop ids {list(ids)} must be token ids >= 0 (or () for the data's end "
                        "tokens)", reason="bad_stop_ids")
    if ids:
        return ids
    data_cfg = read_data(data_cfg)
    if data_cfg.spec.end_ids and not data_cfg.tokenizer:  # a tokenised source's own end tokens
        return data_cfg.spec.end_ids
    return _tokenizer_stop_ids(str(data_cfg.tokenizer))


def prompt_file_tokens(path: str, data_cfg, tokenizer=None) -> list[np.ndarray]:
    """int32 token ids of each usable row of prompt file ``path`` (see the module doc). Rows
    with neither field, an empty prompt or (``truncation_mode='error'``) a prompt over
    ``max_prompt_length`` are bad rows: ``DataError`` naming file, row and field, or with
    ``data.on_bad_row='skip'`` counted and dropped."""
    bad = BadRows(data_cfg.on_bad_row)
    keep = int(data_cfg.max_prompt_length)
    rows = io.read_jsonl(path)
    out: dict[int, np.ndarray] = {}
    texts: list[tuple[int, Any]] = []
    for i, r in enumerate(rows):
        try:
            if r.get("prompt_ids") is not None:
                out[i] = np.asarray(r["prompt_ids"], np.int32)[-keep:]
            elif isinstance(r.get("prompt"), (str, list)):
                texts.append((i, r["prompt"]))
            else:
                raise DataError(f"a prompt row needs 'prompt' (text or messages) or "
                                f"'prompt_ids' (row has {sorted(r)})", file=path, row=i,
                                field="prompt", reason="missing_field")
        except DataError as e:
            bad.handle(e)
    if texts:
        encoder = PairTokenizer(tokenizer if tokenizer is not None
                                else load_tokenizer(data_cfg.tokenizer), data_cfg)
        where = [_Where(path, i) for i, _ in texts]
        encoded = encoder.encode_prompts([t for _, t in texts], where, bad)
        out.update({i: np.asarray(ids, np.int32) for (i, _), ids in zip(texts, encoded)
                    if ids is not None})
    prompts = []
    for i in sorted(out):
        if out[i].size == 0:
            bad.handle(DataError("the prompt has no token (empty text and no BOS)", file=path,
                                 row=i, field="prompt", reason="empty_prompt"))
        else:
            prompts.append(out[i])
    return prompts


class _Where:
    def __init__(self, file: str, row: int):
        self.file, self.row = file, row


def load_prompts(split: str, *, prompt_file: str, eval_prompt_file: str, max_prompts: int,
                 data_cfg, tokenizer=None) -> list[np.ndarray]:
    """Token-id prompts of ``split`` ('train' or 'eval'): rows of ``prompt_file`` /
    ``eval_prompt_file`` (:func:`prompt_file_tokens`: a text prompt gets the tokens a training
    pair's prompt gets), else the distinct prompts of ``data_cfg``'s split; at most
    ``max_prompts`` (0 = all). ``tokenizer``: ``data_cfg.tokenizer`` loaded when None. Raises
    ValueError when none is usable."""
    path = prompt_file if split == "train" else eval_prompt_file
    if path:
        prompts = prompt_file_tokens(path, data_cfg, tokenizer)
    elif split == "eval" and prompt_file:
        return []
    else:
        pairs, _ = load_tokenised_pairs(data_cfg, split, tokenizer)
        seen: set[bytes] = set()
        prompts = []
        for pair in pairs:
            key = pair["prompt"].tobytes()
            if key not in seen:
                seen.add(key)
                prompts.append(np.asarray(pair["prompt"], np.int32))
    if max_prompts:
        prompts = prompts[:max_prompts]
    if not prompts or min(len(x) for x in prompts) == 0:
        raise ValueError(f"no usable (non-empty) prompts for split {split!r}")
    return prompts


class PromptStream(BatchStream):
    """Fixed-shape prompt batches: ``prompt_ids`` [b, width] int32 (right-padded with
    ``pad_id``), ``prompt_lengths`` [b] int32 and ``weight`` [b] float32, ``b`` this process's
    block of the global batch.

    A ``BatchStream`` over prompts (train: endless, reshuffled each epoch from
    ``(seed, epoch)``; eval: one pass in order, the last batch filled with prompt 0 at weight 0).
    Raises ``ValueError`` when ``width`` is shorter than the longest prompt."""

    item_name = "prompts"

    def __init__(self, prompts: list[np.ndarray], *, train: bool, global_batch_size: int,
                 width: int, seed: int, pad_id: int = 0, process_index: int = 0,
                 process_count: int = 1):
        super().__init__(len(prompts), train=train, global_batch_size=global_batch_size,
                         seed=seed, process_index=process_index, process_count=process_count)
        longest = max(len(x) for x in prompts)
        if width < longest:
            raise ValueError(f"prompt width {width} < longest prompt {longest}")
        self.prompts, self.width, self.pad_id = prompts, int(width), int(pad_id)

    def batch_at(self, epoch: int, position: int) -> dict[str, np.ndarray]:
        """This host's block of global batch ``position`` of ``epoch`` (pure)."""
        idx, weight = self.batch_items(epoch, position)
        idx = self.host_block(idx)
        ids = np.full((len(idx), self.width), self.pad_id, np.int32)
        lengths = np.zeros(len(idx), np.int32)
        for r, i in enumerate(idx):
            x = self.prompts[int(i)]
            ids[r, :len(x)], lengths[r] = x, len(x)
        return {"prompt_ids": ids, "prompt_lengths": lengths, "weight": self.host_block(weight)}

    @property
    def stats(self) -> dict[str, Any]:
        return dict(super().stats, num_prompts=len(self.prompts), prompt_width=self.width)
