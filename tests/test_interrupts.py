"""Real signals to a real `kdaudit run`: killed during base pretraining (SIGKILL), in the
middle of an epoch (SIGINT), while scoring (SIGTERM) and while writing the report (SIGKILL),
restarted with the same command each time. Ctrl-C and SIGTERM end in the resume hint, exit
130 and no traceback. The finished run's tables equal those of an
uninterrupted run of the same config and seed in another process (determinism), and no
stage that had finished before a kill runs again."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
from small_smoke import CONFIG

from kdaudit.cli import RESUME_HINT
from kdaudit.store import read_json

pytestmark = pytest.mark.slow
TIMEOUT = 600


def _command(tmp_path: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "kdaudit", "run", "--preset", "smoke", "--config",
            str(tmp_path / "run.toml"), "--out", str(out)]


def _env(cache: Path) -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "KDAUDIT_CACHE": str(cache)}


def _running(run: Path, stage: str) -> bool:
    manifest = run / "manifest.json"
    return manifest.exists() and \
        read_json(manifest)["stages"].get(stage, {}).get("status") == "running"


def _signals_as_from_a_terminal() -> None:
    """In the child before it starts: SIGINT and SIGTERM handled and not blocked, whatever the
    test process inherited (a run started with SIGINT ignored, as a shell does for background
    jobs, rightly ignores Ctrl-C)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _warn_if_sigint_is_not_default() -> None:
    """Say so when this test process has SIGINT ignored, handled otherwise or blocked."""
    handler = signal.getsignal(signal.SIGINT)
    blocked = signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    if handler is not signal.default_int_handler or blocked:
        warnings.warn(f"test process: SIGINT handler {handler!r}, blocked {blocked}; the runs "
                      f"get the default handling")


def _run_until(cmd, env, log: Path, stage: str, sig: int, ready) -> list[str]:
    """Start `cmd`, wait until it announces `[run ] <stage>` and `ready()` holds, send
    `sig`; return its stdout lines. A run that finishes first fails the test."""
    with log.open("w") as errors:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True, env=env,
                             preexec_fn=_signals_as_from_a_terminal)
        lines = []
        for line in p.stdout:
            lines.append(line)
            if line.strip() == f"[run ] {stage}":
                break
        start = time.monotonic()
        while not ready() and p.poll() is None and time.monotonic() < start + TIMEOUT:
            time.sleep(0.01)
        waited, ended = time.monotonic() - start, p.poll()
        p.send_signal(sig)
        rest, _ = p.communicate(timeout=TIMEOUT)
    lines += rest.splitlines(keepends=True)
    everything = (f"signal {sig} after waiting {waited:.2f} s for `{stage}`; the run had "
                  f"{'already ended' if ended is not None else 'not ended'} then\n"
                  f"{''.join(lines)}\n{log.read_text()}")
    if sig == signal.SIGKILL:
        assert p.returncode == -signal.SIGKILL, f"exit {p.returncode}:\n{everything}"
    else:    # Ctrl-C and SIGTERM: the resume hint, no traceback
        assert p.returncode == 130, f"exit {p.returncode}:\n{everything}"
        assert RESUME_HINT in log.read_text() and "Traceback" not in everything, everything
    return lines


def _tables(run: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((run / "tables").glob("*.csv"))}


def test_a_run_killed_four_times_finishes_with_the_uninterrupted_tables(tmp_path):
    _warn_if_sigint_is_not_default()
    # a longer teacher (3× the steps) keeps its checkpoint up for seconds on an idle machine
    # too, so the SIGINT below lands mid-training however fast the machine is
    config = CONFIG.replace("[teacher]\nepochs = 2.0", "[teacher]\nepochs = 6.0")
    assert config != CONFIG
    (tmp_path / "run.toml").write_text(config)
    env = _env(tmp_path / "cache")
    chain = tmp_path / "chain"
    run = chain / "smoke"
    # the first checkpoint's state folder stays until the stage ends (its step marker does
    # not: each save removes it first), so a slow poll cannot fall between two markers
    checkpoint_state = run / "models" / "teacher.ckpt" / "state"
    kills = [("base_teacher", signal.SIGKILL, lambda: _running(run, "base_teacher")),
             ("teacher", signal.SIGINT, checkpoint_state.exists),
             ("audit:teacher", signal.SIGTERM, lambda: _running(run, "audit:teacher")),
             ("report", signal.SIGKILL, lambda: _running(run, "report"))]
    done_before: set[str] = set()
    for stage, sig, ready in kills:
        lines = _run_until(_command(tmp_path, chain), env, tmp_path / f"{stage}.err", stage,
                           sig, ready)
        rerun = {ln.split()[-1] for ln in lines if ln.startswith("[run ]")}
        assert not rerun & done_before, f"finished stages ran again: {rerun & done_before}"
        stages = read_json(run / "manifest.json")["stages"]
        assert stages[stage]["status"] != "done", f"the kill missed stage {stage}"
        done_before = {k for k, v in stages.items() if v["status"] == "done"}
    finish = subprocess.run(_command(tmp_path, chain), env=env, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert finish.returncode == 0, f"{finish.stdout}\n{finish.stderr}"
    rerun = {ln.split()[-1] for ln in finish.stdout.splitlines() if ln.startswith("[run ]")}
    assert not rerun & done_before, f"finished stages ran again: {rerun & done_before}"
    assert not list(run.rglob("*.tmp")), "temporary files were left behind"

    straight = subprocess.run(_command(tmp_path, tmp_path / "straight"), env=env,
                              capture_output=True, text=True, timeout=TIMEOUT)
    assert straight.returncode == 0, f"{straight.stdout}\n{straight.stderr}"
    ours, theirs = _tables(run), _tables(tmp_path / "straight" / "smoke")
    assert sorted(ours) == sorted(theirs) and len(ours) >= 7
    for name in ours:
        assert ours[name] == theirs[name], f"tables/{name} differs from the uninterrupted run"
