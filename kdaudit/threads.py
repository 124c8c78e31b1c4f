"""CPU thread policy: a short OpenMP spin, and a governor that gives cores back while another
process needs them, without changing a bit of what the run computes.

PyTorch's CPU build parallelises each operator over an OpenMP team, and libgomp's workers
spin after each parallel region, waiting for the next one. Alone on a machine that is what
makes small operators fast; beside another process doing the same, the spinning threads
take the cores the other process's threads need, and both slow down more than in proportion.
`benchmarks/perf/bench_threads.py` measures the policies side by side: a short spin
(`GOMP_SPINCOUNT`) keeps the speed alone and cuts the slowdown beside a competitor;
`OMP_WAIT_POLICY=PASSIVE` (no spin) cuts it further but is slow alone where operators are
small (measured on `make demo`: the teacher stage 157 s against 97 s, every training stage
35-60% slower). OpenMP reads these once, when torch is first imported, so kdaudit sets the
spin on import, before torch, unless the user set a policy or `KDAUDIT_THREADS=off`.

`Governor` (the default, `KDAUDIT_THREADS` unset or `adaptive`): every couple of seconds it
reads how long this process's threads waited for a CPU (Linux's per-thread schedstat) and
drops a thread while they wait, so two runs on one machine each get their own cores instead
of stalling each other's OpenMP teams; it tries one thread more now and then, and keeps it if
nothing waits. The thread count would change the last bits of two CPU operators, LayerNorm's
weight gradients and attention over short queries (generation), so while it governs, those
are kept at the starting count's bits (`kdaudit.thread_invariance`): a run's numbers do not
depend on what ran beside it. `KDAUDIT_THREADS=fixed` keeps the short spin and the starting
thread count; `off` leaves torch's own policy.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

SPINCOUNT = "10000"     # libgomp's default is 300,000 (OMP_WAIT_POLICY unset)
MODES = ("", "adaptive", "fixed", "off")    # "" is "adaptive"


def _requested() -> str:
    return os.environ.get("KDAUDIT_THREADS", "").strip().lower()


def mode() -> str:
    """`KDAUDIT_THREADS`, checked: 'adaptive' (also when unset), 'fixed' or 'off'."""
    value = _requested()
    if value not in MODES:
        raise ValueError(f"KDAUDIT_THREADS={value!r}: expected one of 'adaptive' (the "
                         f"default), 'fixed' or 'off'")
    return value or "adaptive"


def configure() -> None:
    """Default GOMP_SPINCOUNT to a short spin (only effective before torch is imported). It
    runs on import, so a bad KDAUDIT_THREADS is left for the CLI to name (`mode`)."""
    if _requested() == "off" or "OMP_WAIT_POLICY" in os.environ:
        return
    os.environ.setdefault("GOMP_SPINCOUNT", SPINCOUNT)


@dataclass
class Governor:
    """Decides the thread count from how many of this process's threads waited for a CPU.

    `decide(waiting)` takes the mean number of threads that sat runnable but not running over
    the last interval (0 alone; about 0.7 for two threads beside one busy process on two
    cores) and returns the count for the next interval: one fewer (or as many fewer as
    waited) at `threshold` or more; after `probe_after` quiet intervals below the maximum,
    one more, and if that one waits the next probe comes twice as late (up to 8×)."""
    maximum: int
    threshold: float = 0.25
    probe_after: int = 10
    threads: int = field(init=False)
    _quiet: int = field(default=0, init=False)
    _backoff: int = field(default=1, init=False)
    _probing: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        if self.maximum < 1:
            raise ValueError(f"Governor maximum must be >= 1 thread, got {self.maximum}")
        self.threads = self.maximum

    def decide(self, waiting: float) -> int:
        if waiting >= self.threshold and self.threads > 1:
            if self._probing:
                self._backoff = min(2 * self._backoff, 8)
            self.threads = max(1, self.threads - max(1, round(waiting)))
            self._quiet, self._probing = 0, False
        elif self.threads < self.maximum:
            if self._probing:                   # the extra thread did not wait: keep it
                self._backoff = 1
            self._quiet += 1
            self._probing = self._quiet >= self.probe_after * self._backoff
            if self._probing:
                self.threads, self._quiet = self.threads + 1, 0
        else:
            self._probing, self._backoff = False, 1
        return self.threads


def _run_delays() -> dict[int, int] | None:
    """{thread id: nanoseconds it has waited on a run queue} for this process, or None where
    the kernel does not report it."""
    delays = {}
    for task in Path("/proc/self/task").glob("*"):
        try:
            delays[int(task.name)] = int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
    return delays or None


class _Sampler:
    """Feeds the governor every `interval` seconds, from the main thread's module calls."""

    def __init__(self, governor: Governor, interval: float):
        self.governor, self.interval = governor, interval
        self.t, self.delays = time.monotonic(), _run_delays() or {}

    def __call__(self, *_) -> None:
        now = time.monotonic()
        if now - self.t < self.interval or threading.current_thread() is not \
                threading.main_thread():
            return
        delays = _run_delays() or {}
        waited = sum(max(0, d - self.delays[tid]) for tid, d in delays.items()
                     if tid in self.delays)
        span = now - self.t
        waiting = waited / 1e9 / span
        self.t, self.delays = now, delays
        import torch

        n, before = self.governor.decide(waiting), torch.get_num_threads()
        if n != before:
            torch.set_num_threads(n)
            print(f"[threads] {before} → {n}: {waiting:.2f} threads waited for a CPU on "
                  f"average over the last {span:.1f} s", file=sys.stderr, flush=True)


_sampler: _Sampler | None = None


def govern(interval: float = 2.0) -> Governor | None:
    """Unless `KDAUDIT_THREADS` is `fixed` or `off`, start governing torch's thread count
    (once per process; call it from the thread that runs the models) and return the governor;
    None where there is nothing to govern (one thread), no run-queue statistics, or a torch
    build whose LayerNorm gradients cannot be kept at the starting count's bits. It samples on
    module forward calls, so every stage, training, scoring and generation, is covered without
    a call of its own."""
    global _sampler
    if mode() != "adaptive":
        return None
    if _sampler is not None:
        return _sampler.governor
    import torch

    from kdaudit import thread_invariance

    count = torch.get_num_threads()
    if count == 1:
        return None
    if _run_delays() is None:
        why = "this system does not report how long threads wait for a CPU " \
              "(/proc/self/task/*/schedstat)"
    elif not thread_invariance.install(count):
        why = f"this torch build's LayerNorm gradients could not be kept at {count} threads' bits"
    else:
        _sampler = _Sampler(Governor(count), interval)
        torch.nn.modules.module.register_module_forward_pre_hook(_sampler)
        return _sampler.governor
    if _requested() == "adaptive":
        warnings.warn(f"KDAUDIT_THREADS=adaptive: {why}, so the thread count stays fixed",
                      RuntimeWarning, stacklevel=2)
    return None
