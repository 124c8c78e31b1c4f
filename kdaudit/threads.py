"""CPU thread policy: OpenMP workers that stop spinning soon after a parallel region.

PyTorch's CPU build parallelises each operator over an OpenMP team, and libgomp's workers
spin after each parallel region, waiting for the next one. Alone on a machine that is what
makes small operators fast; beside another process doing the same, the spinning threads
take the cores the other process's threads need, and both slow down more than in proportion.
`benchmarks/perf/bench_threads.py` measures the policies side by side: a short spin
(`GOMP_SPINCOUNT`) keeps the speed alone and cuts the slowdown beside a competitor;
`OMP_WAIT_POLICY=PASSIVE` (no spin) cuts it further but is slow alone where operators are
small (measured on `make demo`: the teacher stage 157 s against 97 s, every training stage
35–60% slower), so it is not the default. OpenMP reads these once, when torch is first
imported, so kdaudit sets them on import, before torch, unless the user set them or
`KDAUDIT_THREADS=off`.
"""
from __future__ import annotations

import os

SPINCOUNT = "10000"     # libgomp's default is 300,000 (OMP_WAIT_POLICY unset)


def configure() -> None:
    """Default GOMP_SPINCOUNT to a short spin (only effective before torch is imported)."""
    if os.environ.get("KDAUDIT_THREADS", "").lower() == "off" or \
            "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ.setdefault("GOMP_SPINCOUNT", SPINCOUNT)
