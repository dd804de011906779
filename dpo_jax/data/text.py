"""Single-sequence data for SFT: token-example files and the ``TextPipeline`` batch stream.

A token-example file is jsonl(.gz) of pre-tokenised ``{"prompt": [ids], "response": [ids]}``
rows (``prompt`` may be absent), which is how the IMDb pipeline feeds reviews; ``load_examples``
also takes (prompt, chosen) of a run's preference data.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping

import numpy as np

from dpo_jax.data import batching, config as config_lib, io, synthetic
from dpo_jax.data.errors import DataError
from dpo_jax.data.pipeline import load_tokenised_pairs
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


class TextPipeline:
    """Fixed-shape batches of single sequences with ``loss_mask`` and ``example_weight``.

    Same contract as ``PreferencePipeline`` (endless reshuffled train stream, one padded eval
    pass, ``state_dict``/``load_state_dict``, ``stats``), same bucketing / packing code
    (``data.batching``); sequence slot s of a batch is example s. Packed row counts are
    multiples of ``row_multiple`` (the run passes its batch-shard count).
    """

    def __init__(self, examples: list[dict[str, np.ndarray]], cfg, *, train: bool,
                 global_batch_size: int, target: str = "response", process_index: int = 0,
                 process_count: int = 1, seed: int = 0, pad_id: int = 0,
                 row_multiple: int = 1):
        if target not in ("response", "text"):
            raise ValueError(f"sft.target must be 'response' or 'text', got {target!r}")
        if global_batch_size % process_count:
            raise ValueError("global batch size not divisible by the process count")
        max_len = int(cfg.max_length)
        self.seqs: list[tuple[np.ndarray, int]] = []
        truncated = 0
        for ex in examples:
            tokens = np.concatenate([ex["prompt"], ex["response"]]).astype(np.int32)
            p_len = 0 if target == "text" else len(ex["prompt"])
            if len(tokens) > max_len:
                truncated += 1
                tokens = tokens[:max_len]
            if len(tokens) - max(p_len, 1) >= 1:  # at least one scored token
                self.seqs.append((tokens, p_len))
        if not self.seqs or (train and len(self.seqs) < global_batch_size):
            raise DataError(f"{len(self.seqs)} usable examples for a batch of {global_batch_size}")
        self.cfg, self.train, self.B = cfg, train, global_batch_size
        self.p, self.P, self.seed, self.pad_id = process_index, process_count, int(seed), pad_id
        self.lengths = np.asarray([len(t) for t, _ in self.seqs], np.int64)
        self.row_multiple = math.lcm(int(cfg.row_multiple), int(row_multiple), process_count)
        self.epoch = self.position = 0
        buckets = config_lib.parse_buckets(cfg.buckets)
        if buckets is None or self.lengths.max() > buckets[-1]:
            maxima = [self.lengths[np.maximum(b, 0)].max() for b in self._batches(0)]
            buckets = batching.choose_buckets(np.asarray(maxima), cfg.num_buckets,
                                              cfg.bucket_multiple)
        self.buckets = buckets
        self.pack_length = int(cfg.pack_length) or buckets[-1]
        self._stats = {"examples": len(self.seqs), "dropped": len(examples) - len(self.seqs),
                       "truncated": truncated, "tokens": int(self.lengths.sum())}

    @property
    def num_batches(self) -> int:
        n = len(self.seqs)
        return n // self.B if self.train else -(-n // self.B)

    def _batches(self, epoch: int) -> np.ndarray:
        n, B = len(self.seqs), self.B
        if not self.train:
            order = np.full(self.num_batches * B, -1, np.int64)
            order[:n] = np.arange(n)
            return order.reshape(-1, B)
        rng = np.random.default_rng([int(self.cfg.shuffle_seed), self.seed, epoch])
        return rng.permutation(n)[: self.num_batches * B].reshape(-1, B)

    def batch_at(self, epoch: int, position: int) -> dict[str, np.ndarray]:
        """This host's rows of global batch ``position`` of ``epoch`` (pure)."""
        idx = self._batches(epoch)[position]
        weight = (idx >= 0).astype(np.float32)
        idx = np.where(idx >= 0, idx, 0)
        plan = batching.make_plan(self.lengths[idx], self.buckets, bool(self.cfg.packing),
                                  self.pack_length, self.row_multiple)
        rows = plan.rows // self.P
        r0, r1 = self.p * rows, (self.p + 1) * rows
        seqs = {s: self.seqs[int(idx[s])] for s in range(self.B) if r0 <= plan.row[s] < r1}
        out = batching.materialise(plan, seqs, r0, r1, self.pad_id)
        per_host = self.B // self.P
        out["example_weight"] = weight[self.p * per_host:(self.p + 1) * per_host]
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.position >= self.num_batches:
            self.position = 0
            if not self.train:
                raise StopIteration
            self.epoch += 1
        batch = self.batch_at(self.epoch, self.position)
        self.position += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": len(self.seqs), "global_batch_size": self.B}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k, v in (("num_examples", len(self.seqs)), ("global_batch_size", self.B),
                     ("seed", self.seed)):
            if k in state and int(state[k]) != v:
                raise DataError(f"cannot resume: state has {k}={state[k]}, pipeline has {v}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    @property
    def stats(self) -> dict[str, Any]:
        return dict(self._stats, buckets=list(self.buckets), batches_per_epoch=self.num_batches)


def load_examples(config, split: str) -> tuple[list[dict[str, np.ndarray]], int]:
    """SFT examples of ``split`` ('train' | 'eval') and the pad id."""
    s = config.sft
    if s.source == "tokens":
        path = s.train_path if split == "train" else s.eval_path
        if not path:
            raise ValueError(f"sft.source='tokens' needs sft.{split}_path")
        return read_token_examples(path), 0
    if s.source == "preference":
        config_lib.validate(config.data)
        tok = None if config.data.source == "synthetic" else load_tokenizer(
            config.data.tokenizer)
        pairs, _ = load_tokenised_pairs(config.data, split, tok)
        pad = synthetic.EOS_ID if tok is None else int(
            tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id)
        return [{"prompt": p["prompt"], "response": p["chosen"]} for p in pairs], pad
    raise ValueError(f"sft.source must be 'preference' or 'tokens', got {s.source!r}")
