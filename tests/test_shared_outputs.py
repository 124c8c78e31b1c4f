"""Output folders are safe to share and hard to lose: one kdaudit process per folder (a lock
no killed run leaves stale), an unwritable folder refused before any work, files readable as
the umask says, and strict JSON. (Interrupts by real signals: tests/test_interrupts.py.)"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kdaudit.cli import main
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


def test_debug_anywhere_on_the_line_shows_the_traceback(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    args = ["audit", "--teacher", "nosuch", "--members", "m.jsonl", "--nonmembers", "n.jsonl",
            "--out", str(blocker / "out")]
    assert main(args) == 2
    for debug in (["--debug", *args], [*args, "--debug"]):
        with pytest.raises(Exception, match="cannot write the output here"):
            main(debug)
