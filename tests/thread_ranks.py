"""Threads standing in for the processes of a launcher, for tests of code that runs in every
process and meets at collectives: `Exchange.share` is the collective (each thread's value, in
rank order, in every thread), `run_ranks` runs one function per rank and re-raises the first
error (aborting the barrier, so no thread waits forever)."""
from __future__ import annotations

import threading
from typing import Any, Callable


class Exchange:
    """An all-gather among `world` threads."""

    def __init__(self, world: int):
        self.barrier = threading.Barrier(world)
        self.slots: list = [None] * world

    def share(self, rank: int, value: Any) -> list:
        self.slots[rank] = value
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()          # nobody overwrites a slot before all have read it
        return out


def run_ranks(work: Callable[[int], Any], exchange: Exchange, world: int) -> list:
    """`work(rank)` in `world` threads: every thread's result, in rank order."""
    results: list = [None] * world
    errors: list = []

    def one(rank):
        try:
            results[rank] = work(rank)
        except BaseException as e:   # noqa: BLE001 - re-raised below
            errors.append(e)
            exchange.barrier.abort()

    threads = [threading.Thread(target=one, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    if errors:
        raise errors[0]
    return results
