"""Bad input: one exception type that names file, row and field, and a skip counter.

A DPO run that silently drops or mangles pairs changes the objective; so by default any bad row
is an error that says exactly where it is, and ``on_bad_row='skip'`` makes dropping explicit and
counted.
"""

from __future__ import annotations

import collections
import logging

log = logging.getLogger(__name__)


class DataError(ValueError):
    """A data problem, located by ``file``, ``row`` (0-based record index; -1 or None: not
    from a file row) and ``field``; ``reason`` names the kind (counted under it when skipped)."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None,
                 field: str | None = None, reason: str = "bad_row"):
        self.file, self.row, self.field, self.reason = file, row, field, reason
        where = []
        if file:
            where.append(str(file))
        if row is not None and row >= 0:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(": ".join(where + [message]) if where else message)


class BadRows:
    """Raise or count bad rows according to ``on_bad_row`` ('error' | 'skip')."""

    def __init__(self, on_bad_row: str = "error", max_logged: int = 5):
        self.on_bad_row = on_bad_row
        self.counts: collections.Counter[str] = collections.Counter()
        self._max_logged = max_logged

    def handle(self, err: DataError) -> None:
        """Re-raise ``err`` in 'error' mode; otherwise count it under its reason and log a few."""
        if self.on_bad_row == "error":
            raise err
        self.counts[err.reason] += 1
        if sum(self.counts.values()) <= self._max_logged:
            log.warning("skipping bad row: %s", err)

    def keep(self, items: list, encode) -> tuple[list, list[int]]:
        """``([encode(i, item) of the items it takes], [their indices])``: an item whose
        ``encode`` raises DataError is a bad row (:meth:`handle`)."""
        out, kept = [], []
        for i, item in enumerate(items):
            try:
                out.append(encode(i, item))
                kept.append(i)
            except DataError as e:
                self.handle(e)
        return out, kept

    @property
    def total(self) -> int:
        return sum(self.counts.values())
