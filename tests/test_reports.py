"""reports/: each checked-in reference report is exactly what its committed tables render
to today. A change to the report code or the tables without `make reports` fails here."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from kdaudit.report.benchmark import FIGURES_INDEX, write_benchmark_report

REPORTS = Path(__file__).resolve().parents[1] / "reports"
FOLDERS = sorted(p.parent for p in REPORTS.glob("**/meta.json"))
STALE = "is stale: rebuild the reference reports with `make reports`"


def test_the_tiny_reference_report_is_checked_in():
    for name in ("meta.json", "report.md", "report.html", FIGURES_INDEX, "tables/metrics.csv",
                 "tables/paired_tests.csv"):
        assert (REPORTS / "tiny" / name).is_file(), name


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: str(p.relative_to(REPORTS)))
def test_reference_report_is_rebuilt_identically_from_its_tables(folder, tmp_path):
    fresh = tmp_path / "fresh"
    shutil.copytree(folder / "tables", fresh / "tables")
    shutil.copy2(folder / "meta.json", fresh / "meta.json")
    write_benchmark_report(fresh)
    assert (fresh / "report.md").read_text() == (folder / "report.md").read_text(), \
        f"{folder / 'report.md'} {STALE}"
    now = json.loads((fresh / FIGURES_INDEX).read_text())
    committed = json.loads((folder / FIGURES_INDEX).read_text())
    assert sorted(now["figures"]) == sorted(committed["figures"]), f"{folder} figures {STALE}"
    on_disk = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
               for p in (folder / "figures").glob("*.png")}
    assert on_disk == committed["figures"], f"{folder / FIGURES_INDEX} does not match figures/"
    if now["matplotlib"] != committed["matplotlib"]:
        pytest.skip(f"pixels not compared: the figures were drawn by matplotlib "
                    f"{committed['matplotlib']}, this is {now['matplotlib']} (report.md and "
                    f"the figure list did match)")
    for name, digest in committed["figures"].items():
        assert now["figures"][name] == digest, f"{folder / 'figures' / name} {STALE}"
    assert (fresh / "report.html").read_text() == (folder / "report.html").read_text(), \
        f"{folder / 'report.html'} {STALE}"
