"""``dataset.max_rows``: the first N rows, or a seeded uniform sample of N rows.

The random sample is a reservoir read in one pass: every row gets a seeded random priority
and the N rows of lowest priority are kept, in their order in the source. Memory holds one
batch plus the N sampled rows' template values; the same source and seed give the same rows.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from services.dataprep.sources import BATCH_ROWS, Batch
from shared.jobspec import DatasetSpec


def batch_size(batch: Batch) -> int:
    """Rows in a batch."""
    return len(next(iter(batch.values()), []))


@dataclass
class RowLimit:
    """Applies max_rows to a stream of batches and records what it took."""

    max_rows: int | None
    method: str
    seed: int
    read: int = 0  # rows of the source read so far
    kept: int = 0  # rows passed on

    @classmethod
    def of(cls, spec: DatasetSpec) -> RowLimit:
        """The limit a dataset spec asks for."""
        return cls(max_rows=spec.max_rows, method=spec.sample, seed=spec.seed)

    def apply(
        self, batches: Iterator[Batch], *, columns: list[str], progress: Callable[..., Any]
    ) -> Iterator[Batch]:
        """The batches that pass the limit (only ``columns`` of a random sample)."""
        if self.max_rows is None:
            limited = batches
        elif self.method == "head":
            limited = self._head(batches)
        else:
            limited = self._random(batches, columns=columns, progress=progress)
        for batch in limited:
            if self.max_rows is None:
                self.read += batch_size(batch)
            self.kept += batch_size(batch)
            yield batch

    def _head(self, batches: Iterator[Batch]) -> Iterator[Batch]:
        for batch in batches:
            n = min(batch_size(batch), self.max_rows - self.read)
            self.read += n
            yield {name: values[:n] for name, values in batch.items()}
            if self.read >= self.max_rows:
                return

    def _random(
        self, batches: Iterator[Batch], *, columns: list[str], progress: Callable[..., Any]
    ) -> Iterator[Batch]:
        rng = random.Random(self.seed)
        heap: list[tuple[float, int, tuple]] = []  # (-priority, position, values): a max-heap
        for batch in batches:
            n = batch_size(batch)
            values = [batch.get(name, [None] * n) for name in columns]
            for i in range(n):
                priority = rng.random()
                if len(heap) < self.max_rows:
                    heapq.heappush(heap, (-priority, self.read, tuple(v[i] for v in values)))
                elif priority < -heap[0][0]:
                    heapq.heapreplace(heap, (-priority, self.read, tuple(v[i] for v in values)))
                self.read += 1
            progress({"phase": "sampling", "rows_read": self.read})
        chosen = [row for _, _, row in sorted(heap, key=lambda item: item[1])]
        for start in range(0, len(chosen), BATCH_ROWS):
            part = chosen[start : start + BATCH_ROWS]
            yield {name: [row[j] for row in part] for j, name in enumerate(columns)}

    def record(self) -> dict[str, Any]:
        """The manifest's account of the sample: method, seed, rows taken and of how many."""
        if self.max_rows is None:
            return {"method": "all", "seed": None, "rows": self.kept, "of": self.read}
        random_sample = self.method == "random"
        return {
            "method": self.method,
            "seed": self.seed if random_sample else None,
            "rows": self.kept,
            "of": self.read if random_sample else None,
        }
