"""Single-sequence data for SFT: token-example files and the ``TextPipeline`` batch stream.

A token-example file is jsonl(.gz) of pre-tokenised ``{"prompt": [ids], "response": [ids]}``
rows (``prompt`` may be absent), which is how the IMDb pipeline feeds reviews; ``load_examples``
also takes (prompt, chosen) of a run's preference data.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dpo_jax.data import batching, config as config_lib, io
from dpo_jax.data.errors import DataError
from dpo_jax.data.loading import load_tokenised_pairs
from dpo_jax.data.pipeline import pad_id_for
from dpo_jax.data.stream import BatchStream
from dpo_jax.data.tokenize import load_tokenizer


def read_token_examples(path: str) -> list[dict[str, np.ndarray]]:
    """Rows of a jsonl(.gz) token file as {"prompt", "response"} int32 arrays.

    Raises ``DataError`` naming the file and row of a row without ``response``."""
    out = []
    for i, rec in enumerate(io.read_jsonl(path)):
        if "response" not in rec:
            raise DataError("token example without 'response'", file=path, row=i,
                            reason="missing_field")
        out.append({"prompt": np.asarray(rec.get("prompt", []), np.int32),
                    "response": np.asarray(rec["response"], np.int32)})
    return out


def write_token_examples(examples, path: str) -> None:
    """Inverse of :func:`read_token_examples` (atomic; gzip when the name ends in .gz)."""
    io.write_jsonl(({"prompt": [int(t) for t in ex.get("prompt", [])],
                     "response": [int(t) for t in ex["response"]]} for ex in examples), path)


class TextPipeline(BatchStream):
    """Fixed-shape batches of single sequences with ``loss_mask`` and ``example_weight`` [B].

    A ``BatchStream`` over examples (train: endless, reshuffled each epoch from
    ``(data.shuffle_seed, seed, epoch)``; eval: one pass, padded with weight-0 copies of
    example 0) with ``PreferencePipeline``'s bucketing / packing code (``data.batching``);
    sequence slot s of a batch is example s. ``target='response'`` scores the response tokens,
    ``'text'`` every token after the first. Examples longer than ``cfg.max_length`` are cut to
    it; examples left without a scored token are dropped (counted in ``stats``). Packed row
    counts are multiples of ``row_multiple`` (the caller passes its batch-shard count).
    """

    item_name = "usable examples"

    def __init__(self, examples: list[dict[str, np.ndarray]], cfg, *, train: bool,
                 global_batch_size: int, target: str = "response", process_index: int = 0,
                 process_count: int = 1, seed: int = 0, pad_id: int = 0,
                 row_multiple: int = 1):
        if target not in ("response", "text"):
            raise ValueError(f"sft.target must be 'response' or 'text', got {target!r}")
        cfg = config_lib.read_data(cfg)
        max_len = int(cfg.max_length)
        self.seqs: list[tuple[np.ndarray, int]] = []  # (tokens, unscored prefix length)
        truncated = 0
        for ex in examples:
            tokens = np.concatenate([ex["prompt"], ex["response"]]).astype(np.int32)
            p_len = 0 if target == "text" else len(ex["prompt"])
            if len(tokens) > max_len:
                truncated += 1
                tokens = tokens[:max_len]
            if len(tokens) - max(p_len, 1) >= 1:  # at least one scored token
                self.seqs.append((tokens, p_len))
        super().__init__(len(self.seqs), train=train, global_batch_size=global_batch_size,
                         seed=(int(cfg.shuffle_seed), int(seed)), process_index=process_index,
                         process_count=process_count, shuffle=bool(cfg.shuffle))
        self.cfg, self.pad_id = cfg, int(pad_id)
        self.lengths = np.asarray([len(t) for t, _ in self.seqs], np.int64)
        self.row_multiple = math.lcm(int(cfg.row_multiple), int(row_multiple), process_count)
        buckets = batching.parse_buckets(cfg.buckets)
        if buckets is None or self.lengths.max() > buckets[-1]:
            maxima = [self.lengths[np.maximum(b, 0)].max() for b in self.epoch_batches(0)]
            buckets = batching.choose_buckets(np.asarray(maxima), cfg.num_buckets,
                                              cfg.bucket_multiple)
        self.buckets = buckets
        self.pack_length = int(cfg.pack_length) or buckets[-1]
        self._stats = {"examples": len(self.seqs), "dropped": len(examples) - len(self.seqs),
                       "truncated": truncated, "tokens": int(self.lengths.sum())}

    def batch_at(self, epoch: int, position: int) -> dict[str, np.ndarray]:
        """This host's rows of global batch ``position`` of ``epoch`` (pure)."""
        idx, weight = self.batch_items(epoch, position)
        plan = batching.make_plan(self.lengths[idx], self.buckets, bool(self.cfg.packing),
                                  self.pack_length, self.row_multiple,
                                  int(self.cfg.pack_length_step))
        r0, r1 = self.host_rows(plan.rows)
        seqs = {s: self.seqs[int(idx[s])] for s in range(self.global_batch_size)
                if r0 <= plan.row[s] < r1}
        out = batching.materialise(plan, seqs, r0, r1, self.pad_id)
        out["example_weight"] = self.host_block(weight)
        return out

    @property
    def stats(self) -> dict[str, Any]:
        return dict(self._stats, **super().stats, buckets=list(self.buckets))


def load_examples(split: str, *, source: str, path: str, data_cfg
                  ) -> tuple[list[dict[str, np.ndarray]], int]:
    """SFT examples of ``split`` ('train' | 'eval') and the pad id: ``source='tokens'`` reads
    the token file ``path``; ``'preference'`` takes (prompt, chosen) of ``data_cfg``'s pairs.

    Raises ValueError for an unknown source or a missing path."""
    if source == "tokens":
        if not path:
            raise ValueError(f"sft.source='tokens' needs sft.{split}_path")
        return read_token_examples(path), 0
    if source == "preference":
        data_cfg = config_lib.read_data(data_cfg)
        tok = None if data_cfg.tokenised else load_tokenizer(data_cfg.tokenizer)
        pairs, _ = load_tokenised_pairs(data_cfg, split, tok)
        return ([{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs],
                pad_id_for(tok))
    raise ValueError(f"sft.source must be 'preference' or 'tokens', got {source!r}")
