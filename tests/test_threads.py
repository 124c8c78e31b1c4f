"""The thread governor (the default; `KDAUDIT_THREADS=adaptive`): it gives a thread back while
this process's threads wait for a CPU and takes it again once they stop waiting; `fixed` and
`off` keep the thread count. That its changes leave every number as it was is
`test_thread_invariance.py`'s."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from kdaudit.threads import Governor

BUSY = 0.7      # mean threads waiting, as measured for 2 threads beside one busy process
QUIET = 0.0


def run(governor: Governor, waits: list[float]) -> list[int]:
    return [governor.decide(w) for w in waits]


def test_alone_it_keeps_every_thread():
    assert run(Governor(4), [QUIET] * 50) == [4] * 50
    assert run(Governor(2), [0.2] * 50) == [2] * 50     # under the threshold: noise, not a rival


def test_beside_a_busy_process_it_drops_threads_and_probes_less_often_while_probes_fail():
    g = Governor(2, probe_after=3)
    assert g.decide(BUSY) == 1
    # at one thread nothing waits; after 3 quiet intervals it tries 2, which waits again
    assert run(g, [QUIET, QUIET, QUIET]) == [1, 1, 2]
    assert g.decide(BUSY) == 1
    assert run(g, [QUIET] * 6) == [1] * 5 + [2]            # next probe twice as late
    assert g.decide(BUSY) == 1
    assert run(g, [QUIET] * 12) == [1] * 11 + [2]          # then 4×
    assert g.decide(BUSY) == 1
    assert run(g, [QUIET] * 24) == [1] * 23 + [2]          # then 8×, the cap
    assert g.decide(BUSY) == 1
    assert run(g, [QUIET] * 24) == [1] * 23 + [2]


def test_when_the_rival_leaves_the_probe_keeps_its_thread():
    g = Governor(2, probe_after=3)
    run(g, [BUSY, QUIET, QUIET, QUIET, BUSY])               # one failed probe: back-off 2×
    assert run(g, [QUIET] * 6) == [1] * 5 + [2]
    assert run(g, [QUIET] * 40) == [2] * 40                # nothing waits at 2: it stays


def test_it_drops_as_many_threads_as_waited_and_climbs_back_one_at_a_time():
    g = Governor(16, probe_after=2)
    assert g.decide(5.6) == 10
    assert g.decide(1.2) == 9
    assert g.decide(30.0) == 1                             # never below one
    assert run(g, [QUIET] * 4) == [1, 2, 2, 3]
    with pytest.raises(ValueError, match=">= 1"):
        Governor(0)


@pytest.mark.parametrize("mode", ["", "adaptive"])
def test_by_default_it_sets_torch_s_thread_count_from_the_run_queue_waits(mode):
    """The wiring, without timing: fake waits of 1 s per sample drive a real forward pass."""
    script = textwrap.dedent("""
        import itertools, torch
        import torch.nn.functional as F
        from kdaudit import thread_invariance, threads
        torch.set_num_threads(2)
        clock = itertools.count()
        threads._run_delays = lambda: {1: next(clock) * 10**9}     # 1 s waited per sample
        governor = threads.govern(interval=0.0)
        assert governor is not None and governor.maximum == 2
        torch.nn.Linear(4, 4)(torch.zeros(1, 4))
        print(torch.get_num_threads(), thread_invariance.layer_norm is F.layer_norm)
    """)
    env = {**os.environ, "KDAUDIT_THREADS": mode}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split() == ["1", "True"]          # governing, numbers kept
    assert "[threads] 2 → 1:" in proc.stderr              # the change is reported


def test_fixed_and_off_keep_the_thread_count_and_a_bad_mode_is_named(monkeypatch, capsys):
    from kdaudit import threads
    from kdaudit.cli import main

    for mode in ("fixed", "off", " Fixed "):
        monkeypatch.setenv("KDAUDIT_THREADS", mode)
        assert threads.govern() is None
    monkeypatch.setenv("KDAUDIT_THREADS", "adaptve")
    assert main(["report", "no-such-run"]) == 2
    assert ("KDAUDIT_THREADS='adaptve': expected one of 'adaptive' (the default), 'fixed' or "
            "'off'") in capsys.readouterr().err


def test_it_stays_fixed_where_the_numbers_could_not_be_kept(monkeypatch):
    """A torch build whose LayerNorm gradients the emulation does not reproduce: no governor,
    and a warning when the user asked for one."""
    import torch

    from kdaudit import thread_invariance, threads

    monkeypatch.setattr(threads, "_sampler", None)
    monkeypatch.setattr(thread_invariance, "reproduces_native", lambda count: False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setenv("KDAUDIT_THREADS", "adaptive")
        with pytest.warns(RuntimeWarning, match="could not be kept at 2 threads' bits"):
            assert threads.govern() is None
        monkeypatch.delenv("KDAUDIT_THREADS")
        assert threads.govern() is None
    finally:
        torch.set_num_threads(before)
    assert threads._sampler is None


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="Linux /proc only")
def test_run_queue_waits_are_read_for_every_thread_of_the_process():
    import threading

    from kdaudit import threads

    delays = threads._run_delays()
    assert delays is not None and threading.get_native_id() in delays
    assert all(isinstance(v, int) and v >= 0 for v in delays.values())
