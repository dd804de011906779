"""Preference pairs as batches: ``load_tokenised_pairs`` (config -> tokenised pairs),
``PreferencePipeline`` (a ``BatchStream`` of pairs) and ``build_pipeline`` (both in one call).

Every host tokenises the whole split (cheap next to training, and needed so all hosts agree on
the shuffle and on each batch's shape), then materialises only the rows its devices own: the
global batch is laid out as in ARCHITECTURE.md (rows 0..B-1 chosen, B..2B-1 rejected; packed
rows by plan) and host p of P holds rows [p R/P, (p+1) R/P) and pairs [p B/P, (p+1) B/P) of
``pair_weight`` (and of the [2B] ``ref_logps``/``ref_lengths`` when reference log-probs are
given) -- the contiguous blocks ``jax.make_array_from_process_local_data`` expects when the
leading axis is sharded over all devices in process order.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import numpy as np

from dpo_jax.data import batching, config as config_lib, prefix, synthetic
from dpo_jax.data.errors import DataError
from dpo_jax.data.stream import BatchStream
from dpo_jax.data.tokenize import TokenPair
from dpo_jax.data.mixture import mixture_order

log = logging.getLogger("dpo_jax.data")


def _synthetic_pairs(cfg, split: str) -> list[TokenPair]:
    """The synthetic task's pairs of ``split``: train from ``train_seed``, eval from
    ``eval_seed`` (its first ``eval_size`` when > 0), before ``max_pairs``. With
    ``synthetic.turns > 1``: one pair per conversation (``synthetic.conversation_pair``)."""
    s = cfg.synthetic
    task, n, seed = synthetic.split_draw(cfg, split)
    if int(s.turns) > 1:  # one pair per conversation (data.synthetic.conversation_pairs)
        return [synthetic.conversation_pair(c, s.conversation_pairs)
                for c in synthetic.make_conversations(task, n, seed, int(s.turns),
                                                      int(s.turn_shift))]
    if s.from_lists:  # the binarised ranked lists (data/ranked.py's synthetic lists)
        return synthetic.best_vs_random(
            synthetic.make_ranked(task, n, seed, int(s.num_responses)), seed)
    return synthetic.make_pairs(task, n, seed)


class PreferencePipeline(BatchStream):
    """Preference pairs as batches in the ARCHITECTURE.md layout, with ``stats``.

    A ``BatchStream`` over pairs (train: endless, reshuffled each epoch from
    ``(data.shuffle_seed, seed, epoch)`` or, with ``data.shuffle=False``, in file order every
    epoch; optionally grouped by length; eval: one pass in file
    order, padded with weight-0 copies of pair 0). Each batch holds this process's rows of the
    bucketed (or packed) global batch and its block of ``pair_weight`` [B].

    ``reference``: ``(logps_N2, lengths_N2)`` float32, one row per pair (column 0 chosen,
    1 rejected), e.g. from ``dpo_jax.reference.reference_logps``; each batch then also carries
    ``ref_logps`` and ``ref_lengths``, this process's block of the [2B] global layout (chosen of
    the B pairs, then rejected). Raises ``ValueError`` when their shape is not ``[N, 2]``.

    ``mixture``: ``[(name, weight, count)]`` when ``pairs`` are several sources' pairs
    concatenated in that order (``load_mixture_pairs``); train then orders each epoch by
    ``data.mixture.mixture_order`` (every batch holds the sources by weight), the stream state
    carries the mixture (a resume with another one is refused) and ``stats['mixture']`` gives
    each source's pairs, weight, share of the epoch's slots and the pairs served.

    ``row_multiple``: packed and prefix-shared row counts are multiples of it (and of
    ``data.row_multiple`` and ``process_count``); the tasks pass the mesh's data-parallel size
    (``sharding.num_batch_shards``) so such rows always split over the mesh."""

    item_name = "pairs"

    def __init__(self, pairs: list[TokenPair], cfg, *, train: bool, global_batch_size: int,
                 process_index: int = 0, process_count: int = 1, seed: int = 0,
                 pad_id: int = 0, load_stats: dict | None = None,
                 reference: tuple[np.ndarray, np.ndarray] | None = None,
                 mixture: list[tuple[str, float, int]] | None = None, row_multiple: int = 1):
        if mixture is not None and sum(int(k) for _, _, k in mixture) != len(pairs):
            raise ValueError(f"mixture counts {[k for _, _, k in mixture]} do not add up to the "
                             f"{len(pairs)} pairs")
        self.mixture = None if not mixture else [(str(n), float(w), int(k))
                                                 for n, w, k in mixture]
        self._served = np.zeros(len(self.mixture or []), np.int64)
        cfg = config_lib.read_data(cfg)
        super().__init__(len(pairs), train=train, global_batch_size=global_batch_size,
                         seed=(int(cfg.shuffle_seed), int(seed)), process_index=process_index,
                         process_count=process_count, shuffle=bool(cfg.shuffle))
        self.pairs, self.cfg, self.pad_id = pairs, cfg, int(pad_id)
        # data.prefix_sharing: one [prompt, chosen, rejected] unit per pair (data/prefix.py)
        self.prefix_sharing = bool(cfg.prefix_sharing)
        self.reference = None
        if reference is not None:
            logps_N2, lengths_N2 = (np.asarray(a, np.float32) for a in reference)
            for name, a in (("logps", logps_N2), ("lengths", lengths_N2)):
                if a.shape != (len(pairs), 2):
                    raise ValueError(f"reference {name} have shape {a.shape}, want "
                                     f"({len(pairs)}, 2): one (chosen, rejected) row per pair")
            self.reference = (logps_N2, lengths_N2)
        self.lengths = self._item_lengths(pairs)  # [N, 3] prompt, chosen, rejected
        # Per-pair weights (a pair's "weight", from data.weight_field; 1 when absent).
        self.weights = np.asarray([p.get("weight", 1.0) for p in pairs], np.float32)
        self.row_multiple = math.lcm(int(cfg.row_multiple), int(row_multiple), process_count)
        self._stats: dict[str, Any] = dict(load_stats or {})
        self._tokens = [0, 0]  # real, total (padded) tokens of the global batches this epoch
        self._shapes: dict[str, int] = {}
        self._padding_per_epoch: list[float] = []
        buckets = batching.parse_buckets(cfg.buckets)
        longest = self._longest(np.arange(len(pairs)))
        if buckets is None:
            maxima = [self._longest(b) for b in self.epoch_batches(0)]
            buckets = batching.choose_buckets(np.asarray(maxima), cfg.num_buckets,
                                              cfg.bucket_multiple)
            # Epoch 0's batches need not hold the longest unit (a train split drops its last
            # partial batch; unpaired KL pairings change with the epoch): one more bucket.
            if longest > buckets[-1]:
                buckets = buckets + [batching.round_up(longest, cfg.bucket_multiple)]
        elif longest > buckets[-1]:
            log.warning("longest sequence %d exceeds buckets %s; adding a bucket", longest, buckets)
            buckets = buckets + [batching.round_up(longest, cfg.bucket_multiple)]
        self.buckets = buckets
        self.pack_length = int(cfg.pack_length) or buckets[-1]
        if cfg.packing and self.pack_length < longest:
            what = "prefix-shared unit (prompt + both responses)" if self.prefix_sharing else \
                "sequence"
            raise ValueError(f"pack_length {self.pack_length} < longest {what} {longest}: "
                             "raise data.pack_length (0 = the largest bucket)")

    def _item_lengths(self, pairs: list[TokenPair]) -> np.ndarray:
        """[N, 1 + K]: prompt and response lengths of each item (pairs: K = 2)."""
        return batching.pair_lengths(pairs)

    def train_order(self, epoch: int, rng: np.random.Generator) -> np.ndarray:
        if self.mixture is None:
            return super().train_order(epoch, rng)
        return mixture_order([k for _, _, k in self.mixture], [w for _, w, _ in self.mixture],
                             seed=self.seed, epoch=epoch, shuffle=self.shuffle)

    def _source_of(self, idx: np.ndarray) -> np.ndarray:
        """The mixture source index of pairs ``idx``."""
        ends = np.cumsum([k for _, _, k in self.mixture])
        return np.searchsorted(ends, idx, side="right")

    def _unit_lengths(self, idx: np.ndarray) -> np.ndarray:
        """Columns of what the planner places for pairs ``idx``: their 2B prompt + response
        sequences, or with prefix sharing their B shared units."""
        if self.prefix_sharing:
            return prefix.unit_lengths(self.lengths[idx])
        return batching.seq_lengths_of(self.lengths[idx])

    def _longest(self, idx: np.ndarray) -> int:
        """Longest sequence (prefix sharing: unit) of pairs ``idx`` (eval padding -1 reads the
        last pair, which only ever makes a bucket larger)."""
        return int(self._unit_lengths(idx).max())

    def arrange(self, order_N: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """``data.group_by_length`` = k: sort pairs by length within windows of k batches, then
        shuffle the batches of each window; 0 keeps the shuffled order."""
        B = self.global_batch_size
        window = int(self.cfg.group_by_length) * B
        if not window:
            return order_N.reshape(-1, B)
        total = self.lengths[:, 0] + self.lengths[:, 1:].max(axis=1)
        chunks = []
        for start in range(0, len(order_N), window):
            chunk = order_N[start:start + window]
            chunk = chunk[np.argsort(total[chunk], kind="stable")].reshape(-1, B)
            chunks.append(chunk[rng.permutation(len(chunk))])
        return np.concatenate(chunks)

    def batch_at(self, epoch: int, position: int) -> dict[str, np.ndarray]:
        """This host's rows of global batch ``position`` of ``epoch`` (pure: no state change)."""
        idx, weight = self.batch_items(epoch, position)
        B = self.global_batch_size
        plan, r0, r1 = self.plan_rows(idx)
        if self.prefix_sharing:  # unit s: pair s's prompt and both responses
            units = {}
            for s in range(B):
                if r0 <= plan.row[s] < r1:
                    pair = self.pairs[int(idx[s])]
                    units[s] = (pair["prompt"], [pair["chosen"], pair["rejected"]])
            return self._finish(idx, weight,
                                prefix.materialise(plan, units, r0, r1, self.pad_id))
        seqs = {}
        for s in range(2 * B):  # sequence slot s: chosen of pair s, or rejected of pair s - B
            if r0 <= plan.row[s] < r1:
                pair = self.pairs[int(idx[s % B])]
                resp = pair["chosen"] if s < B else pair["rejected"]
                seqs[s] = (np.concatenate([pair["prompt"], resp]), len(pair["prompt"]))
        return self._finish(idx, weight, batching.materialise(plan, seqs, r0, r1, self.pad_id))

    def plan_rows(self, idx: np.ndarray):
        """``(plan, r0, r1)``: the rows of the batch of items ``idx`` (``prefix.make_plan``
        with prefix sharing, else ``batching.make_plan``) and this host's block ``[r0, r1)``."""
        make_plan = prefix.make_plan if self.prefix_sharing else batching.make_plan
        plan = make_plan(self._unit_lengths(idx), self.buckets, bool(self.cfg.packing),
                         self.pack_length, self.row_multiple, int(self.cfg.pack_length_step))
        return (plan, *self.host_rows(plan.rows))

    def _finish(self, idx: np.ndarray, weight: np.ndarray, out: dict) -> dict[str, np.ndarray]:
        """A batch's rows with this host's block of the per-pair arrays added."""
        out["pair_weight"] = self.host_block(weight * self.weights[idx])
        if self.reference is not None:
            logps_N2, lengths_N2 = self.reference
            out["ref_logps"] = self.host_block(np.concatenate([logps_N2[idx, 0], logps_N2[idx, 1]]))
            out["ref_lengths"] = self.host_block(
                np.concatenate([lengths_N2[idx, 0], lengths_N2[idx, 1]]))
        return out

    def _record(self, batch: Mapping[str, np.ndarray]) -> None:
        """Count the served batch's shape and its global real / padded tokens (the same on
        every host: real tokens from the pair lengths, padded ones from the host's rows)."""
        shape = "x".join(map(str, batch["input_ids"].shape))
        self._shapes[shape] = self._shapes.get(shape, 0) + 1
        idx, weight = self.batch_items(self.epoch, self.position)
        self._tokens[0] += int(self._unit_lengths(idx).sum())
        if self.mixture is not None:
            self._served += np.bincount(self._source_of(idx[weight > 0]),
                                        minlength=len(self.mixture))
        self._tokens[1] += batch["input_ids"].size * self.process_count

    def _end_epoch(self) -> None:
        frac = 1.0 - self._tokens[0] / max(self._tokens[1], 1)
        self._padding_per_epoch.append(frac)
        log.info("data epoch %d (%s): padding fraction %.3f, shapes %s", self.epoch,
                 "train" if self.train else "eval", frac, self._shapes)
        self._tokens = [0, 0]

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        if self.mixture is not None:
            out["mixture"] = [list(m) for m in self.mixture]
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """``BatchStream.load_state_dict``; also refuses a state of another mixture (sources,
        weights or pair counts) or of a single source for a mixture and vice versa."""
        stored = [tuple(m) for m in state.get("mixture") or []] or None
        have = None if self.mixture is None else [tuple(m) for m in self.mixture]
        if stored != have:
            raise DataError(f"cannot resume: the checkpoint's data state has mixture={stored}, "
                            f"this stream has {have} (name, weight, pairs); resume with the "
                            "run's original data.sources")
        super().load_state_dict(state)
        self._tokens = [0, 0]
        self._served[:] = 0

    @property
    def stats(self) -> dict[str, Any]:
        """Loading stats (tokenisation, skipped rows, lengths) and what was served: buckets,
        padding fraction of the global batches per epoch, this host's batch shapes seen."""
        out = dict(self._stats)
        out.update(super().stats)  # 'stream': train or eval; 'split': how its rows were chosen
        out.update(num_pairs=len(self.pairs), buckets=list(self.buckets),
                   pack_length=self.pack_length if self.cfg.packing else None,
                   pack_length_step=int(self.cfg.pack_length_step) if self.cfg.packing else None,
                   padding_fraction_per_epoch=list(self._padding_per_epoch),
                   shapes_seen=dict(self._shapes))
        if self.mixture is not None:
            if self.train:
                slots = self._source_of(self.epoch_batches(0).reshape(-1))
                share = np.bincount(slots, minlength=len(self.mixture)) / max(len(slots), 1)
            else:
                share = np.asarray([k for _, _, k in self.mixture]) / len(self.pairs)
            served = max(int(self._served.sum()), 1)
            total_w = sum(w for _, w, _ in self.mixture)
            out["mixture"] = {n: {"weight": w, "target_fraction": w / total_w, "pairs": k,
                                  "epoch_fraction": float(share[i]),
                                  "served_pairs": int(self._served[i]),
                                  "served_fraction": float(self._served[i] / served)}
                              for i, (n, w, k) in enumerate(self.mixture)}
        return out


def pad_id_for(tokenizer) -> int:
    """The id that fills padding: the tokenizer's pad id (else its EOS), or the synthetic
    task's EOS when ``tokenizer`` is None. Masks never derive from it (it may equal EOS)."""
    if tokenizer is None:
        return synthetic.EOS_ID
    return int(tokenizer.eos_token_id if tokenizer.pad_token_id is None
               else tokenizer.pad_token_id)


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
