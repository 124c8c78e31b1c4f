"""The risk report: tables and plots of an audit's results → report.html and report.md.

    write_report(out_dir, ReportTables(mia=..., roc=..., ...), title=..., redact=True)
    write_suite_report(out_dir, {family: {"mia", "models", "utility", "report"}}, title=...)
    verdicts(mia, baseline="nokd")  # one plain-language verdict per model

Names are imported on first use, so `kdaudit.report.contents` stays light (no plotting).
"""
from __future__ import annotations

import importlib

# light, and bound eagerly: the function shadows its own module's name on the package
from kdaudit.report.verdicts import verdicts

_EXPORTS = {"ReportTables": "kdaudit.report.contents", "write_report": "kdaudit.report.render",
            "write_suite_report": "kdaudit.report.suite"}
__all__ = ["ReportTables", "verdicts", "write_report", "write_suite_report"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kdaudit.report' has no attribute {name!r}")
