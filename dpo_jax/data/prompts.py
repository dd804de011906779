"""Prompts for PPO rollouts: from a prompt file or the prompts of the run's preference data.

A prompt file is jsonl, one row per prompt, with ``prompt_ids`` (token ids, used as given: the
IMDb experiment's ``make_prompts.py`` writes these) or ``prompt`` (text, tokenised with
``config.data.tokenizer`` and cut to ``data.max_prompt_length`` keeping the end). Without a
file, the distinct prompts of ``config.data``'s split are used (e.g. the synthetic task).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from dpo_jax.data import io
from dpo_jax.data.pipeline import load_tokenised_pairs


def load_prompts(config, split: str) -> list[np.ndarray]:
    """Token-id prompts of ``split`` ('train' or 'eval')."""
    p = config.ppo
    path = p.prompt_file if split == "train" else (p.eval_prompt_file or "")
    if path:
        rows = io.read_jsonl(path)
        if rows and "prompt_ids" not in rows[0]:
            from dpo_jax.data.tokenize import load_tokenizer

            tok = load_tokenizer(config.data.tokenizer)
            for r in rows:
                r["prompt_ids"] = tok.encode(r["prompt"], add_special_tokens=False)
        keep = int(config.data.max_prompt_length)
        prompts = [np.asarray(r["prompt_ids"], np.int32)[-keep:] for r in rows]
    elif split == "eval" and p.prompt_file:
        return []
    else:
        pairs, _ = load_tokenised_pairs(config.data, split)
        seen: set[bytes] = set()
        prompts = []
        for pair in pairs:
            key = pair["prompt"].tobytes()
            if key not in seen:
                seen.add(key)
                prompts.append(np.asarray(pair["prompt"], np.int32))
    if p.max_prompts:
        prompts = prompts[: int(p.max_prompts)]
    if not prompts or min(len(x) for x in prompts) == 0:
        raise ValueError(f"no usable (non-empty) prompts for split {split!r}")
    return prompts


class PromptStream:
    """Fixed-shape prompt batches ``(ids [b, P] right-padded, lengths [b], weight [b])``.

    Train: endless, reshuffled each epoch from (seed, epoch). Eval: one pass in order, the last
    batch filled with prompt 0 at weight 0. ``b`` is this host's block of the global batch."""

    def __init__(self, prompts: list[np.ndarray], *, train: bool, global_batch_size: int,
                 width: int, seed: int, pad_id: int = 0, process_index: int = 0,
                 process_count: int = 1):
        if train and len(prompts) < global_batch_size:
            raise ValueError(f"{len(prompts)} prompts < batch size {global_batch_size}")
        if global_batch_size % process_count:
            raise ValueError("batch size must divide over processes")
        longest = max(len(x) for x in prompts)
        if width < longest:
            raise ValueError(f"prompt width {width} < longest prompt {longest}")
        self.prompts, self.train, self.B, self.P = prompts, train, global_batch_size, width
        self.seed, self.pad_id = int(seed), int(pad_id)
        self.p, self.n_proc = process_index, process_count
        self.epoch = self.position = 0

    @property
    def num_batches(self) -> int:
        n = len(self.prompts)
        return n // self.B if self.train else -(-n // self.B)

    def _order(self) -> np.ndarray:
        n = len(self.prompts)
        if self.train:
            return np.random.default_rng([self.seed, self.epoch]).permutation(n)
        return np.arange(n)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.position >= self.num_batches:
            if not self.train:
                self.position = 0
                raise StopIteration
            self.epoch, self.position = self.epoch + 1, 0
        order = self._order()
        idx = order[self.position * self.B:(self.position + 1) * self.B]
        weight = np.ones(self.B, np.float32)
        if len(idx) < self.B:
            weight[len(idx):] = 0.0
            idx = np.concatenate([idx, np.zeros(self.B - len(idx), idx.dtype)])
        self.position += 1
        b = self.B // self.n_proc
        idx, weight = idx[self.p * b:(self.p + 1) * b], weight[self.p * b:(self.p + 1) * b]
        ids = np.full((b, self.P), self.pad_id, np.int32)
        lengths = np.zeros(b, np.int32)
        for r, i in enumerate(idx):
            x = self.prompts[int(i)]
            ids[r, :len(x)], lengths[r] = x, len(x)
        return {"prompt_ids": ids, "prompt_lengths": lengths, "weight": weight}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "num_prompts": len(self.prompts)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["num_prompts"]) != len(self.prompts):
            raise ValueError(f"cannot resume: {state['num_prompts']} prompts in the checkpoint, "
                             f"{len(self.prompts)} now")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    @property
    def stats(self) -> dict[str, Any]:
        return {"num_prompts": len(self.prompts), "prompt_width": self.P,
                "batches_per_epoch": self.num_batches}
