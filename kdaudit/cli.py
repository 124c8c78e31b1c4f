"""The `kdaudit` command. Thin: it parses arguments, builds a config and calls the API."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kdaudit.config import ConfigError, load_config, presets


def _run(args: argparse.Namespace) -> int:
    from kdaudit import run

    overrides = {"seed": args.seed, "out_dir": args.out, "name": args.name}
    cfg = load_config(args.preset, args.config, **overrides)
    result = run(cfg)
    summary = result.audit.summary()
    print("\nMembership-inference AUC (members vs non-members; 0.5 = no signal):")
    print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
    print(f"\nReport: {result.report['html']}\n        {result.report['md']}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from kdaudit import report_run

    paths = report_run(args.run_dir, redact=not args.show_secrets)
    print(f"Report: {paths['html']}\n        {paths['md']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdaudit",
        description="Audit how much private fine-tuning data leaks from a teacher language "
                    "model into the students distilled from it.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the whole pipeline (data, teacher, students, attacks, "
                                   "report) from a preset or a config file",
                       description="Generate or load data, fine-tune the teacher on the "
                                   "members, distil the students, attack every model and write "
                                   "runs/<name>/report/. Finished stages are skipped when run "
                                   "again; an interrupted run resumes.")
    p.add_argument("--preset", default="tiny", choices=presets(),
                   help="starting configuration (default: tiny, the CPU demo)")
    p.add_argument("--config", type=Path, help="TOML file overriding preset fields")
    p.add_argument("--out", help="parent folder of the run directory (default: runs)")
    p.add_argument("--name", help="run name (default: the preset's)")
    p.add_argument("--seed", type=int, help="seed for data split, initialisation and order")
    p.set_defaults(fn=_run)

    p = sub.add_parser("report", help="(re)write the report of a finished run directory",
                       description="Rebuild report.html and report.md from the tables and "
                                   "scores of RUN_DIR without recomputing anything.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--show-secrets", action="store_true",
                   help="do not redact private details in example text")
    p.set_defaults(fn=_report)
    return parser


def _quiet_transformers() -> None:
    """Hide per-load progress bars and advisory warnings; kdaudit shows its own progress."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_transformers()
    try:
        return args.fn(args)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"kdaudit: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
