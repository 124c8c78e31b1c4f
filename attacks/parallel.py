"""Batches shared out among processes: each scores or generates its share, then all merge.

The scoring and generation functions of `attacks` cut their inputs into batches, and a batch's
result does not depend on the other batches. Inside `sharded(shard)`, each of them keeps the
batches `k` with `k % world == rank` and merges the per-sequence results of every process
through `shard.gather`, so every process returns the whole result. The batches are cut
exactly as in one process, so each result is computed on the same padded tensors and equals
the one-process value. Outside `sharded` (the default) there is one process and nothing is
shared out. `attacks` knows no launcher: the caller supplies the gather (e.g. Accelerate's
`gather_object`, see `kdaudit.distributed.scoring_shard`).
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """This process's place among `world` processes; `gather(obj)` returns every process's
    `obj`, in rank order, in every process (a collective: all processes call it together)."""

    rank: int
    world: int
    gather: Callable[[Any], list[Any]]


_current: contextvars.ContextVar[Shard | None] = contextvars.ContextVar("shard", default=None)


@contextlib.contextmanager
def sharded(shard: Shard | None) -> Iterator[None]:
    """Share out the batches of the `attacks` calls inside among `shard.world` processes
    (None, or a world of 1: no sharing)."""
    token = _current.set(shard if shard is not None and shard.world > 1 else None)
    try:
        yield
    finally:
        _current.reset(token)


def is_first() -> bool:
    """True in the process that speaks for the others (rank 0), and alone."""
    shard = _current.get()
    return shard is None or shard.rank == 0


def my_batches(batches: Sequence[T]) -> list[tuple[int, T]]:
    """(batch number, batch) for the batches this process computes."""
    shard = _current.get()
    return [(k, b) for k, b in enumerate(batches)
            if shard is None or k % shard.world == shard.rank]


def merged(local: dict[Any, T]) -> dict[Any, T]:
    """Every process's `local` results (keyed by sequence index) in one dict, in every process."""
    shard = _current.get()
    if shard is None:
        return local
    out: dict[Any, T] = {}
    for part in shard.gather(local):
        out.update(part)
    return out


def in_order(local: dict[int, T], n: int) -> list[T]:
    """Every process's results for sequences 0..n−1 (`local`: this process's, keyed by
    sequence index), merged, as a list in sequence order, in every process."""
    out = merged(local)
    return [out[i] for i in range(n)]
