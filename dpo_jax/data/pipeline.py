"""``build_pipeline``: config -> a resumable, multi-host aware iterator of fixed-shape batches.

Every host tokenises the whole split (cheap next to training, and needed so all hosts agree on
the shuffle and on each batch's shape), then materialises only the rows its devices own: the
global batch is laid out as in ARCHITECTURE.md (rows 0..B-1 chosen, B..2B-1 rejected; packed
rows by plan) and host p of P holds rows [p R/P, (p+1) R/P) and pairs [p B/P, (p+1) B/P) of
``pair_weight`` -- the contiguous blocks ``jax.make_array_from_process_local_data`` expects
when the leading axis is sharded over all devices in process order.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from dpo_jax.data import batching, config as config_lib, synthetic
from dpo_jax.data.errors import BadRows, DataError
from dpo_jax.data.tokenize import PairTokenizer, TokenPair, length_summary, load_tokenizer

log = logging.getLogger("dpo_jax.data")


def _synthetic_pairs(cfg, split: str) -> list[TokenPair]:
    s = cfg.synthetic
    task = synthetic.SyntheticTask(
        vocab_size=s.vocab_size, num_topics=s.num_topics, prompt_len=tuple(s.prompt_len),
        response_len=tuple(s.response_len), min_gap=s.min_gap)
    if split == "train":
        return synthetic.make_pairs(task, s.num_train, s.train_seed)
    n = s.num_eval if cfg.eval_size <= 0 else min(cfg.eval_size, s.num_eval)
    return synthetic.make_pairs(task, n, s.eval_seed)


def load_tokenised_pairs(cfg, split: str, tokenizer=None) -> tuple[list[TokenPair], dict]:
    """Tokenised pairs of ``split`` ('train' or 'eval') and the stats of getting them."""
    bad = BadRows(cfg.on_bad_row)
    stats: dict[str, Any] = {}
    if cfg.source == "synthetic":
        pairs = _synthetic_pairs(cfg, split)
        if cfg.max_pairs:
            pairs = pairs[: cfg.max_pairs]
        too_long = [i for i, p in enumerate(pairs)
                    if len(p["prompt"]) + max(len(p["chosen"]), len(p["rejected"])) > cfg.max_length]
        if too_long:
            raise DataError(f"{len(too_long)} synthetic pairs exceed max_length {cfg.max_length}",
                            file="synthetic", row=too_long[0], reason="prompt_too_long")
    else:
        from dpo_jax.data.sources import load_raw_pairs

        carve = not cfg.eval_split
        split_name = cfg.train_split if (split == "train" or carve) else cfg.eval_split
        raw = load_raw_pairs(cfg, split_name, bad)
        if carve:
            rng = np.random.default_rng([cfg.shuffle_seed, 7919])
            held = set(rng.permutation(len(raw))[: cfg.eval_size].tolist())
            raw = [p for i, p in enumerate(raw) if (i in held) == (split == "eval")]
        elif split == "eval" and cfg.eval_size > 0:
            raw = raw[: cfg.eval_size]
        if cfg.max_pairs:
            raw = raw[: cfg.max_pairs]
        tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
        encoder = PairTokenizer(tok, cfg)
        pairs = encoder(raw, bad)
        stats["tokenisation"] = encoder.stats.as_dict()
    if not pairs:
        raise DataError(f"no usable pairs in split {split!r}", file=cfg.path or cfg.source)
    stats["bad_rows_skipped"] = dict(bad.counts)
    stats["lengths"] = length_summary(pairs)
    return pairs, stats


class PreferencePipeline:
    """Iterator of per-host batches with ``state_dict``/``load_state_dict`` and ``stats``.

    Train: endless, reshuffled each epoch from (shuffle_seed, seed, epoch), the last partial
    batch of an epoch dropped. Eval: one pass in file order covering every pair once; the last
    batch is filled with copies of pair 0 at ``pair_weight`` 0 (copies, not empty sequences, so
    per-length normalised losses stay finite); iterating again starts over."""

    def __init__(self, pairs: list[TokenPair], cfg, *, train: bool, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1, seed: int = 0,
                 pad_id: int = 0, load_stats: dict | None = None):
        if global_batch_size % process_count:
            raise ValueError(f"global_batch_size {global_batch_size} is not divisible by "
                             f"process_count {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if train and len(pairs) < global_batch_size:
            raise DataError(f"{len(pairs)} train pairs < global batch size {global_batch_size}")
        self.pairs, self.cfg, self.train = pairs, cfg, train
        self.B, self.P, self.p = global_batch_size, process_count, process_index
        self.seed, self.pad_id = int(seed), int(pad_id)
        self.lengths = batching.pair_lengths(pairs)
        self.row_multiple = math.lcm(int(cfg.row_multiple), process_count)
        self.epoch, self.position = 0, 0
        self._epoch_cache: tuple[int, np.ndarray] | None = None
        self._stats: dict[str, Any] = dict(load_stats or {})
        self._pad = [0, 0]  # real, total tokens in the current epoch
        self._shapes: dict[str, int] = {}
        self._padding_per_epoch: list[float] = []
        # Optional hook: global pair indices [B] -> per-pair arrays in the global layout (leading
        # axis a multiple of B, e.g. [2B] chosen then rejected); this host gets its block. Used to
        # attach precomputed reference log-probs (dpo_jax/reference.py).
        self.per_pair: Callable[[np.ndarray], dict[str, np.ndarray]] | None = None
        buckets = config_lib.parse_buckets(cfg.buckets)
        longest = int(self._seq_max(np.arange(len(pairs))))
        if buckets is None:
            maxima = [self._seq_max(b) for b in self._batches(0)]
            buckets = batching.choose_buckets(np.asarray(maxima), cfg.num_buckets,
                                              cfg.bucket_multiple)
        elif longest > buckets[-1]:
            log.warning("longest sequence %d exceeds buckets %s; adding a bucket", longest, buckets)
            buckets = buckets + [batching.round_up(longest, cfg.bucket_multiple)]
        self.buckets = buckets
        self.pack_length = int(cfg.pack_length) or buckets[-1]
        if cfg.packing and self.pack_length < longest:
            raise ValueError(f"pack_length {self.pack_length} < longest sequence {longest}")

    # --------------------------------------------------------------------- ordering
    def _seq_max(self, idx: np.ndarray) -> int:
        lens = self.lengths[idx]
        return int((lens[:, 0] + lens[:, 1:].max(axis=1)).max())

    @property
    def num_batches(self) -> int:
        """Batches per epoch (train: full batches only; eval: ceil)."""
        n = len(self.pairs)
        return n // self.B if self.train else -(-n // self.B)

    def _batches(self, epoch: int) -> np.ndarray:
        """[num_batches, B] pair indices of ``epoch`` (-1: eval padding pair)."""
        if self._epoch_cache is not None and self._epoch_cache[0] == epoch:
            return self._epoch_cache[1]
        n, B = len(self.pairs), self.B
        if not self.train:
            order = np.full(self.num_batches * B, -1, np.int64)
            order[:n] = np.arange(n)
            out = order.reshape(-1, B)
        else:
            rng = np.random.default_rng([int(self.cfg.shuffle_seed), self.seed, epoch])
            order = rng.permutation(n)[: self.num_batches * B]
            window = int(self.cfg.group_by_length) * B
            if window:
                total = self.lengths[:, 0] + self.lengths[:, 1:].max(axis=1)
                chunks = []
                for start in range(0, len(order), window):
                    chunk = order[start:start + window]
                    chunk = chunk[np.argsort(total[chunk], kind="stable")].reshape(-1, B)
                    chunks.append(chunk[rng.permutation(len(chunk))])
                out = np.concatenate(chunks)
            else:
                out = order.reshape(-1, B)
        self._epoch_cache = (epoch, out)
        return out

    # --------------------------------------------------------------------- batches
    def batch_at(self, epoch: int, position: int) -> dict[str, np.ndarray]:
        """This host's part of global batch ``position`` of ``epoch`` (pure: no state change)."""
        idx = self._batches(epoch)[position]
        weight = (idx >= 0).astype(np.float32)
        idx = np.where(idx >= 0, idx, 0)
        lens = self.lengths[idx]
        plan = batching.make_plan(batching.seq_lengths_of(lens), self.buckets,
                                  bool(self.cfg.packing), self.pack_length, self.row_multiple)
        rows_per_host = plan.rows // self.P
        r0, r1 = self.p * rows_per_host, (self.p + 1) * rows_per_host
        seqs = {}
        for s in range(2 * self.B):
            if r0 <= plan.row[s] < r1:
                pair = self.pairs[int(idx[s % self.B])]
                resp = pair["chosen"] if s < self.B else pair["rejected"]
                seqs[s] = (np.concatenate([pair["prompt"], resp]), len(pair["prompt"]))
        out = batching.materialise(plan, seqs, r0, r1, self.pad_id)
        bp = self.B // self.P
        out["pair_weight"] = weight[self.p * bp:(self.p + 1) * bp]
        if self.per_pair is not None:
            for k, v in self.per_pair(idx).items():
                n = len(v) // self.P
                out[k] = np.asarray(v)[self.p * n:(self.p + 1) * n]
        real = int(batching.seq_lengths_of(lens).sum())
        self._last_tokens = (real, plan.cost)
        return out

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.position >= self.num_batches:
            if not self.train:
                self.position = 0
                raise StopIteration
        batch = self.batch_at(self.epoch, self.position)
        shape = "x".join(map(str, batch["input_ids"].shape))
        self._shapes[shape] = self._shapes.get(shape, 0) + 1
        self._pad[0] += self._last_tokens[0]
        self._pad[1] += self._last_tokens[1]
        self.position += 1
        if self.position >= self.num_batches:
            self._end_epoch()
        return batch

    def _end_epoch(self) -> None:
        frac = 1.0 - self._pad[0] / max(self._pad[1], 1)
        self._padding_per_epoch.append(frac)
        log.info("data epoch %d (%s): padding fraction %.3f, shapes %s", self.epoch,
                 "train" if self.train else "eval", frac, self._shapes)
        self._pad = [0, 0]
        if self.train:
            self.epoch += 1
            self.position = 0

    # --------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, int]:
        """JSON-serialisable position in the stream."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_pairs": len(self.pairs), "global_batch_size": self.B}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where ``state`` was taken; refuses a different dataset or batch."""
        for k, v in (("num_pairs", len(self.pairs)), ("global_batch_size", self.B)):
            if k in state and int(state[k]) != v:
                raise DataError(f"cannot resume: state has {k}={state[k]}, pipeline has {v}")
        if int(state["seed"]) != self.seed:
            raise DataError(f"cannot resume: state seed {state['seed']} != pipeline seed "
                            f"{self.seed}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._pad = [0, 0]

    @property
    def stats(self) -> dict[str, Any]:
        out = dict(self._stats)
        out.update(split="train" if self.train else "eval", num_pairs=len(self.pairs),
                   batches_per_epoch=self.num_batches, buckets=list(self.buckets),
                   pack_length=self.pack_length if self.cfg.packing else None,
                   padding_fraction_per_epoch=list(self._padding_per_epoch),
                   shapes_seen=dict(self._shapes))
        return out


def build_pipeline(data_cfg, *, split: str, global_batch_size: int, process_index: int = 0,
                   process_count: int = 1, seed: int = 0, tokenizer=None) -> PreferencePipeline:
    """The pipeline for ``split`` ('train' or 'eval'; the config maps them to dataset splits)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    config_lib.validate(data_cfg)
    if data_cfg.source != "synthetic" and tokenizer is None:
        tokenizer = load_tokenizer(data_cfg.tokenizer)
    pairs, stats = load_tokenised_pairs(data_cfg, split, tokenizer)
    pad_id = synthetic.EOS_ID if tokenizer is None else int(
        tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id)
    log.info("data %s: %d pairs, lengths %s, skipped %s", split, len(pairs),
             stats.get("lengths", {}).get("total"), stats.get("bad_rows_skipped"))
    return PreferencePipeline(pairs, data_cfg, train=split == "train",
                              global_batch_size=global_batch_size, process_index=process_index,
                              process_count=process_count, seed=seed, pad_id=pad_id,
                              load_stats=stats)


def to_global(batch_np: Mapping[str, np.ndarray], sharding) -> dict[str, Any]:
    """Per-host numpy batch -> global ``jax.Array``s (leading axis split over processes).

    ``sharding`` is one sharding for the [R, L] arrays (a NamedSharding's leading spec entry is
    reused for the 1-D ``pair_weight``) or a mapping key -> sharding."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    out = {}
    for k, v in batch_np.items():
        s = sharding[k] if isinstance(sharding, Mapping) else sharding
        if isinstance(s, NamedSharding) and len(s.spec) > v.ndim:
            s = NamedSharding(s.mesh, PartitionSpec(*s.spec[: v.ndim]))
        global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
        out[k] = jax.make_array_from_process_local_data(s, v, global_shape)
    return out
