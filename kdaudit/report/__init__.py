"""The risk report: tables and plots of an audit's results → report.html and report.md.

    write_report(out_dir, mia=..., roc=..., memorization=..., utility=..., examples=...,
                 models=..., config=..., title=..., run_info=..., redact=True)
    write_suite_report(out_dir, {family: {"mia", "models", "utility", "report"}}, title=...)
    verdicts(mia, baseline="nokd")  # one plain-language verdict per model
"""
from kdaudit.report.render import write_report
from kdaudit.report.suite import write_suite_report
from kdaudit.report.verdicts import verdicts

__all__ = ["write_report", "write_suite_report", "verdicts"]
