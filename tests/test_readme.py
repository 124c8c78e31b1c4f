"""The README's run-and-audit commands, copied from it verbatim, work on a fresh folder; what
they write for sharing holds no private detail of the records."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def _block_with(lang: str, needle: str) -> str:
    found = [b for b in _blocks(lang) if needle in b]
    assert len(found) == 1, f"README: expected one ```{lang} block with {needle!r}"
    return found[0]


def _kdaudit_commands(block: str) -> list[list[str]]:
    """Each `kdaudit ...` command of a shell block, continuation lines joined."""
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True)[1:] for line in lines
            if line.strip().startswith("kdaudit ")]


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """The README's Python snippet, then its audit command, in an empty folder."""
    from kdaudit.cli import main

    folder = tmp_path_factory.mktemp("readme")
    mp = pytest.MonkeyPatch()
    mp.chdir(folder)
    try:
        snippet = _block_with("python", "kdaudit.audit_models(")
        namespace: dict = {}
        exec(compile(snippet, "README.md (Python API)", "exec"), namespace)
        [audit_cmd] = _kdaudit_commands(_block_with("bash", "kdaudit audit"))
        assert main(audit_cmd) == 0
    finally:
        mp.undo()
    return folder, namespace, audit_cmd


def test_python_snippet_runs_and_audits(readme_run):
    folder, ns, _ = readme_run
    assert (folder / "runs" / "smoke" / "report" / "report.html").exists()
    audit = ns["audit"]
    auc = audit.mia.query("metric == 'auc'").set_index(["model", "signal"]).value
    assert 0.0 <= auc[("teacher", "loss")] <= 1.0
    # records are scored at the models' own context (256 positions for the smoke models);
    # the ones that do not fit are counted, not silently cut
    assert audit.config["max_length"] == 256
    assert any("longer than 256 tokens" in n for n in audit.notes)
    assert (folder / "my_report" / "report.md").exists()


def test_audit_command_writes_tables_and_a_report(readme_run):
    folder, _, cmd = readme_run
    out = folder / cmd[cmd.index("--out") + 1]
    mia = pd.read_csv(out / "tables" / "mia.csv")
    assert {"teacher", "kd", "nokd"} <= set(mia.model)
    md = (out / "report" / "report.md").read_text()
    assert "longer than 256 tokens" in md.split("## ")[0]          # stated at the top
    assert "kdaudit audit <the same arguments> --show-secrets" in md


def test_shareable_files_hold_no_secret(readme_run):
    """tables/, scores/ and report/ of the run and of the audit carry none of the members'
    secrets; the generations in clear live under private/, which the README names."""
    folder, _, cmd = readme_run
    run_dir = folder / "runs" / "smoke"
    members = [json.loads(x) for x in (run_dir / "data" / "members.jsonl").read_text()
               .splitlines() if x]
    secrets = {s for m in members for s in m["secrets"] if len(s) > 4}
    assert len(secrets) > 300
    shared = [*run_dir.glob("tables/*.csv"), *run_dir.glob("report/report.*"),
              *folder.joinpath(cmd[cmd.index("--out") + 1]).glob("*/*.csv"),
              *folder.joinpath(cmd[cmd.index("--out") + 1]).glob("report/report.*")]
    texts = {p: p.read_text() for p in shared}
    for p in run_dir.glob("scores/*.parquet"):
        texts[p] = pd.read_parquet(p).to_csv()
    assert len(texts) > 15
    for path, text in texts.items():
        leaked = [s for s in secrets if s in text]
        assert not leaked, f"{path} shows {leaked[:3]}"
    assert list((run_dir / "private").glob("*.generations.parquet"))
    assert "private/" in README.read_text()
