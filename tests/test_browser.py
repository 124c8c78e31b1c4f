"""The HTML reports render in a real browser: headless Chromium (Debian's `chromium`
package) loads each report, every <img> decodes, and the screenshot is not blank. Skipped,
with the reason, where Chromium is absent."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser",
                                                "google-chrome"))), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is absent (Debian package `chromium`): the "
                             "HTML reports were not checked in a browser")
REPORTS = Path(__file__).resolve().parents[1] / "reports"
PROBE = ('<script>window.addEventListener("load", () => { const all = [...document.images];'
         ' const broken = all.filter(i => !(i.complete && i.naturalWidth > 0)).length;'
         ' document.body.setAttribute("data-probe", `images=${all.length} broken=${broken}`);'
         ' });</script></body>')


def _chromium(tmp_path: Path, *args: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
           f"--user-data-dir={tmp_path / 'profile'}", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, f"{cmd} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p.stdout


def images(html: Path, tmp_path: Path) -> tuple[int, int]:
    """(number of <img>, how many failed to decode) once the page has loaded."""
    probe = tmp_path / "probe.html"
    probe.write_text(html.read_text(encoding="utf-8").replace("</body>", PROBE),
                     encoding="utf-8")
    dom = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    found = dom.split('data-probe="images=', 1)[1].split('"', 1)[0]
    total, broken = found.split(" broken=")
    return int(total), int(broken)


def blank_fraction(html: Path, tmp_path: Path) -> float:
    """Share of the screenshot's pixels that are page-background white."""
    from matplotlib.image import imread

    shot = tmp_path / "shot.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", html.as_uri())
    pixels = imread(shot)[..., :3]
    return float(np.all(pixels > 0.97, axis=-1).mean())


def _run_report(tmp_path: Path) -> Path:
    """A run report (kdaudit.report.write_report) over a small synthetic audit."""
    import pandas as pd

    from kdaudit.audit.results import _mia_rows
    from kdaudit.report import ReportTables, write_report

    rng = np.random.default_rng(0)
    labels = np.repeat([1, 0], 200)
    rows, roc = [], {}
    for model, shift in (("teacher", 1.0), ("nokd", 0.0), ("kd", 0.4)):
        roc[model] = {}
        for signal in ("loss", "zlib"):
            r, roc[model][signal] = _mia_rows(model, signal, rng.normal(size=400) + shift * labels,
                                              labels, n_bootstrap=50, seed=0)
            rows += r
    paths = write_report(tmp_path / "run", ReportTables(mia=pd.DataFrame(rows), roc=roc))
    return paths["html"]


def test_run_report_renders_in_chromium(tmp_path):
    html = _run_report(tmp_path)
    total, broken = images(html, tmp_path)
    assert total >= 4 and broken == 0
    assert blank_fraction(html, tmp_path) < 0.97


@pytest.mark.parametrize("html", sorted(REPORTS.glob("**/report.html")),
                         ids=lambda p: str(p.parent.relative_to(REPORTS)))
def test_reference_report_renders_in_chromium(html, tmp_path):
    total, broken = images(html, tmp_path)
    assert total >= 4 and broken == 0
    assert blank_fraction(html, tmp_path) < 0.97


def test_a_broken_image_and_a_blank_page_are_caught(tmp_path):
    """The negative controls: an image whose data is cut short counts as broken, and an
    empty page as blank."""
    html = _run_report(tmp_path)
    text = html.read_text(encoding="utf-8")
    start = text.index("data:image/png;base64,") + len("data:image/png;base64,")
    html.write_text(text[:start] + "AAAA" + text[start + 4000:], encoding="utf-8")
    total, broken = images(html, tmp_path)
    assert broken == 1 and total >= 4
    empty = tmp_path / "empty.html"
    empty.write_text("<!DOCTYPE html><html><body></body></html>")
    assert blank_fraction(empty, tmp_path) > 0.99
