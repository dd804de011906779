"""Prompts for PPO rollouts: from a prompt file or the prompts of the run's preference data.

A prompt file is jsonl(.gz), one row per prompt, with ``prompt_ids`` (token ids, used as given: the
IMDb experiment's ``make_prompts.py`` writes these) or ``prompt`` (text, tokenised with
``config.data.tokenizer`` and cut to ``data.max_prompt_length`` keeping the end). Without a
file, the distinct prompts of ``config.data``'s split are used (e.g. the synthetic task).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dpo_jax.data import io
from dpo_jax.data.pipeline import load_tokenised_pairs
from dpo_jax.data.stream import BatchStream


def load_prompts(split: str, *, prompt_file: str, eval_prompt_file: str, max_prompts: int,
                 data_cfg) -> list[np.ndarray]:
    """Token-id prompts of ``split`` ('train' or 'eval'): rows of ``prompt_file`` /
    ``eval_prompt_file`` (``prompt_ids``, or ``prompt`` text tokenised with ``data_cfg.tokenizer``
    and cut to ``data_cfg.max_prompt_length`` keeping the end), else the distinct prompts of
    ``data_cfg``'s split; at most ``max_prompts`` (0 = all). Raises ValueError when none is
    usable."""
    path = prompt_file if split == "train" else eval_prompt_file
    if path:
        rows = io.read_jsonl(path)
        if rows and "prompt_ids" not in rows[0]:
            from dpo_jax.data.tokenize import load_tokenizer

            tok = load_tokenizer(data_cfg.tokenizer)
            for r in rows:
                r["prompt_ids"] = tok.encode(r["prompt"], add_special_tokens=False)
        keep = int(data_cfg.max_prompt_length)
        prompts = [np.asarray(r["prompt_ids"], np.int32)[-keep:] for r in rows]
    elif split == "eval" and prompt_file:
        return []
    else:
        pairs, _ = load_tokenised_pairs(data_cfg, split)
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
