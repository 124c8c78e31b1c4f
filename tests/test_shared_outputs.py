"""Output folders are safe to share and hard to lose: one kdaudit process per folder (a lock
no killed run leaves stale), an unwritable folder refused before any work, files readable as
the umask says, strict JSON, and an interrupt that ends in the resume hint, not a
traceback."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdaudit.cli import RESUME_HINT, main
from kdaudit.errors import FolderBusyError
from kdaudit.store import FolderLock, atomic_write_frame, atomic_write_json, atomic_write_text, \
    read_json

HOLD = "import sys, time\nfrom kdaudit.store import FolderLock\n" \
       "with FolderLock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(600)\n"


def _holder(folder: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    assert line.strip() == "held", f"holder failed:\n{line}{p.stderr.read()}"
    return p


def test_a_second_process_is_refused_and_a_killed_one_leaves_no_stale_lock(tmp_path):
    holder = _holder(tmp_path / "run")
    try:
        with pytest.raises(FolderBusyError,
                           match=rf"another kdaudit run \(pid {holder.pid}\) is using this "
                                 rf"folder"):
            with FolderLock(tmp_path / "run"):
                pass
        code = main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "run")])
        assert code == 2                       # no manifest: refused before the lock
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with FolderLock(tmp_path / "run"):         # the dead holder's lock went with it
        pass
    with FolderLock(tmp_path / "run"):         # and a released lock can be taken again
        pass


def test_the_cli_names_the_busy_folder_in_one_line(tmp_path, capsys):
    holder = _holder(tmp_path / "out")
    try:
        code = main(["audit", "--teacher", "nosuch", "--members", "m.jsonl", "--nonmembers",
                     "n.jsonl", "--out", str(tmp_path / "out")])
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert f"another kdaudit run (pid {holder.pid}) is using this folder" in err


def test_an_unwritable_output_folder_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code = main(["audit", "--teacher", "nosuch", "--members", "m.jsonl", "--nonmembers",
                 "n.jsonl", "--out", str(blocker / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"{blocker / 'out'}: cannot write the output here" in err


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_follow_the_umask(tmp_path, umask):
    import pandas as pd

    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "report.md", "x")
        atomic_write_json(tmp_path / "manifest.json", {"a": 1})
        atomic_write_frame(tmp_path / "mia.csv", pd.DataFrame({"a": [1]}))
    finally:
        os.umask(old)
    for name in ("report.md", "manifest.json", "mia.csv"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_json_is_strict_and_reads_back(tmp_path):
    path = tmp_path / "manifest.json"
    atomic_write_json(path, {"epsilons": [2.0, math.inf], "x": -math.inf, "n": math.nan})

    def refuse(constant):
        raise AssertionError(f"not JSON: {constant}")

    raw = json.loads(path.read_text(), parse_constant=refuse)
    assert raw["epsilons"] == [2.0, "inf"]
    back = read_json(path)
    assert back["epsilons"] == [2.0, math.inf] and back["x"] == -math.inf
    assert math.isnan(back["n"])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_prints_the_resume_hint_not_a_traceback(tmp_path, sig):
    """A real signal to a real `kdaudit run` in the middle of the teacher's training."""
    cmd = [sys.executable, "-m", "kdaudit", "run", "--preset", "smoke", "--out", str(tmp_path)]
    errors = open(tmp_path / "stderr.txt", "w+")   # a file: progress bars never block it
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    seen = []
    for line in p.stdout:                      # stage lines, then the teacher's first steps
        seen.append(line)
        if "[run ] teacher" in line:
            break
    time.sleep(2.0)
    p.send_signal(sig)
    out, _ = p.communicate(timeout=120)
    errors.seek(0)
    err = errors.read()
    errors.close()
    everything = "".join(seen) + out + err
    assert p.returncode == 130, f"exit {p.returncode}:\n{everything}"
    assert RESUME_HINT in err and "Traceback" not in everything, everything
    run = tmp_path / "smoke"
    manifest = read_json(run / "manifest.json")
    assert manifest["stages"]["data"]["status"] == "done"
    assert manifest["stages"].get("teacher", {}).get("status") != "done"
    assert not list(run.rglob("*.tmp")), "a temporary file was left behind"
    with FolderLock(run):                      # the interrupted run released its folder
        pass
