"""``BatchStream``: the one skeleton of every batch stream (preference pairs, text, prompts).

A stream serves global batches of ``global_batch_size`` items (pairs, sequences or prompts;
``num_items`` of them) and hands this process its block:

* **order**: epoch ``e``'s item order is ``np.random.default_rng([*seed, e]).permutation``
  (train) or file order (eval, and train with ``shuffle=False``: the same order every epoch,
  for debugging and parity runs against other trainers); ``[num_batches, global_batch_size]``
  item indices per epoch, ``-1`` for eval padding (:meth:`epoch_batches`);
* **train**: endless; each epoch reshuffled, its last partial batch dropped;
* **eval**: one pass in order covering every item once; the last batch is filled with copies of
  item 0 at weight 0 (copies, not empty items, so per-length normalised numbers stay finite);
  iterating again starts over;
* **process slice**: process p of P builds only its block of each global batch: the leading-axis
  block ``[p n/P, (p+1) n/P)`` of every array (:meth:`host_block`, :meth:`host_rows`), the
  contiguous blocks ``jax.make_array_from_process_local_data`` expects when the leading axis is
  sharded over all devices in process order;
* **state**: ``state_dict()`` is the JSON-serialisable position (epoch, position) plus what must
  not change across a resume (item count, global batch size, seed, shuffle), checked by
  ``load_state_dict``.

A subclass builds one batch from item indices (:meth:`batch_at`) and may arrange an epoch's
shuffled order into batches differently (:meth:`arrange`, e.g. grouping by length).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from dpo_jax.data.errors import DataError


class BatchStream:
    """Iterator of this process's block of fixed-size global batches (see the module doc).

    ``seed`` is one int or a sequence of ints (e.g. ``(data.shuffle_seed, run seed)``); the
    epoch number is appended to it to seed each epoch's order. ``shuffle=False`` serves train
    items in file order (``seed`` still seeds :meth:`arrange`'s rng). ``item_name`` names the
    items in error messages. Raises ``ValueError`` for a process index or batch size that does
    not fit the process count, ``DataError`` when there are no items or (train) fewer than one
    batch."""

    item_name = "items"

    def __init__(self, num_items: int, *, train: bool, global_batch_size: int,
                 seed: int | Sequence[int], process_index: int = 0, process_count: int = 1,
                 shuffle: bool = True):
        if global_batch_size <= 0 or global_batch_size % process_count:
            raise ValueError(f"global batch size {global_batch_size} is not a positive multiple "
                             f"of the process count {process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        if num_items == 0:
            raise DataError(f"no {self.item_name} to batch")
        if train and num_items < global_batch_size:
            raise DataError(f"{num_items} train {self.item_name} < global batch size "
                            f"{global_batch_size}")
        self.num_items, self.train = int(num_items), bool(train)
        self.global_batch_size = int(global_batch_size)
        self.process_index, self.process_count = int(process_index), int(process_count)
        self.seed = tuple(int(s) for s in np.atleast_1d(np.asarray(seed, np.int64)))
        self.shuffle = bool(shuffle)
        self.epoch, self.position = 0, 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    # ------------------------------------------------------------------ order
    @property
    def num_batches(self) -> int:
        """Batches per epoch (train: full batches only; eval: ceil)."""
        n, B = self.num_items, self.global_batch_size
        return n // B if self.train else -(-n // B)

    @property
    def host_batch_size(self) -> int:
        """Items of each global batch that this process holds."""
        return self.global_batch_size // self.process_count

    def train_order(self, epoch: int, rng: np.random.Generator) -> np.ndarray:
        """Train: epoch ``epoch``'s item order ``[num_items]`` (the caller keeps the first
        ``num_batches * B``): ``rng.permutation`` (``rng`` seeded by ``(*seed, epoch)``), or the
        file order without ``shuffle``. Subclasses may order differently (e.g. a mixture)."""
        del epoch
        return rng.permutation(self.num_items) if self.shuffle else np.arange(self.num_items)

    def arrange(self, order_N: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Train: an epoch's shuffled item order ``[num_batches * B]`` -> ``[num_batches, B]``
        batches. The default keeps the shuffled order; ``rng`` continues the epoch's stream."""
        del rng
        return order_N.reshape(-1, self.global_batch_size)

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """``[num_batches, global_batch_size]`` int64 item indices of ``epoch`` (-1: eval
        padding). Pure; the last epoch's result is cached."""
        if self._order_cache is not None and self._order_cache[0] == epoch:
            return self._order_cache[1]
        n, B = self.num_items, self.global_batch_size
        if self.train:
            rng = np.random.default_rng([*self.seed, epoch])
            out = self.arrange(self.train_order(epoch, rng)[: self.num_batches * B], rng)
        else:
            order = np.full(self.num_batches * B, -1, np.int64)
            order[:n] = np.arange(n)
            out = order.reshape(-1, B)
        self._order_cache = (epoch, out)
        return out

    def batch_items(self, epoch: int, position: int) -> tuple[np.ndarray, np.ndarray]:
        """``(indices [B], weight [B] float32)`` of global batch ``position`` of ``epoch``: eval
        padding slots hold item 0 at weight 0, every other slot weight 1."""
        idx = self.epoch_batches(epoch)[position]
        weight = (idx >= 0).astype(np.float32)
        return np.where(idx >= 0, idx, 0), weight

    # ------------------------------------------------------------------ process slice
    def host_block(self, x: np.ndarray) -> np.ndarray:
        """This process's block of the leading axis of a global-layout array (length a multiple
        of the process count)."""
        n = len(x) // self.process_count
        return x[self.process_index * n:(self.process_index + 1) * n]

    def host_rows(self, rows: int) -> tuple[int, int]:
        """``(start, stop)`` of this process's rows out of ``rows`` global rows."""
        per_host = rows // self.process_count
        return self.process_index * per_host, (self.process_index + 1) * per_host

    # ------------------------------------------------------------------ batches
    def batch_at(self, epoch: int, position: int) -> dict[str, np.ndarray]:
        """This process's block of global batch ``position`` of ``epoch`` (pure)."""
        raise NotImplementedError

    def _record(self, batch: Mapping[str, np.ndarray]) -> None:
        """Bookkeeping for ``stats`` on each batch served by ``__next__`` (default: none)."""

    def _end_epoch(self) -> None:
        """Bookkeeping for ``stats`` after an epoch's last batch (default: none)."""

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.position >= self.num_batches:  # eval only: the pass is over
            self.position = 0
            raise StopIteration
        batch = self.batch_at(self.epoch, self.position)
        self._record(batch)
        self.position += 1
        if self.position == self.num_batches:
            self._end_epoch()
            if self.train:
                self.epoch, self.position = self.epoch + 1, 0
        return batch

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position in the stream and the settings a resume must match."""
        return {"epoch": self.epoch, "position": self.position, "seed": list(self.seed),
                "num_items": self.num_items, "global_batch_size": self.global_batch_size,
                "shuffle": self.shuffle}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where ``state`` was taken. Raises ``DataError`` when the item count,
        global batch size, seed or shuffle differ (another dataset, batch or order: resuming
        would silently train on a different stream) or a field is missing (``shuffle`` absent:
        a shuffled stream)."""
        missing = {"epoch", "position", "seed", "num_items", "global_batch_size"} - set(state)
        if missing:
            raise DataError(f"cannot resume: data state lacks {sorted(missing)} (a checkpoint "
                            "from an older version; start a new run)")
        have = {"num_items": self.num_items, "global_batch_size": self.global_batch_size,
                "seed": list(self.seed), "shuffle": self.shuffle}
        for key, value in have.items():
            if key == "shuffle":
                stored = bool(state.get("shuffle", True))
            elif key == "seed":
                stored = [int(s) for s in state[key]]
            else:
                stored = int(state[key])
            if stored != value:
                raise DataError(f"cannot resume: the checkpoint's data state has {key}={stored}, "
                                f"this {type(self).__name__} has {value}; resume with the "
                                f"run's original data and batch settings")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    @property
    def stats(self) -> dict[str, Any]:
        """What was served, for logs and the run summary (subclasses add their own).
        ``stream`` is 'train' or 'eval'; ``split`` is left to the loading stats (which rows
        of which dataset split were read, ``holdout`` sizes)."""
        return {"stream": "train" if self.train else "eval",
                "batches_per_epoch": self.num_batches}
