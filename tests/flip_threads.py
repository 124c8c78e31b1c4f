"""`kdaudit` with the thread governor switching torch between 2 threads and 1 every 50 ms,
whatever the machine's load: `python tests/flip_threads.py run --preset smoke ...`. Each
switch goes to stderr as the governor reports it (`[threads] 2 → 1: ...`)."""
from __future__ import annotations

import sys

import torch

from kdaudit import threads
from kdaudit.cli import main


class Flip:
    """A governor that asks for the other count at every sample."""

    def __init__(self, count: int):
        self.maximum = count

    def decide(self, waiting: float) -> int:
        return 1 if torch.get_num_threads() == self.maximum else self.maximum


if __name__ == "__main__":
    threads._run_delays = lambda: {1: 0}        # the governor needs the statistics to exist
    threads.Governor = Flip
    govern = threads.govern
    threads.govern = lambda: govern(interval=0.05)
    torch.set_num_threads(2)
    sys.exit(main(sys.argv[1:]))
