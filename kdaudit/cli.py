"""The `kdaudit` command. Thin: it parses arguments, builds a config and calls the API."""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from pathlib import Path

from kdaudit import threads
from kdaudit.cli_jobs import add_dp_sgd_flags, add_student_parser, add_teacher_parser
from kdaudit.config import AuditConfig, ConfigError, load_config, presets
from kdaudit.errors import FolderBusyError
from kdaudit.store import FolderLock


def _run(args: argparse.Namespace) -> int:
    from kdaudit import run

    dp = {k: v for k, v in (("unit", args.dp_unit),
                            ("reproducible_noise", args.reproducible_noise or None)) if v}
    overrides = {"seed": args.seed, "out_dir": args.out, "name": args.name, "dp": dp or None}
    from kdaudit.pipeline import check_contexts

    cfg = load_config(args.preset, args.config, **overrides)
    try:       # the checks that look at the models (a preset's own values always pass them)
        for one in [cfg.for_family(f) for f in cfg.families] or [cfg]:
            check_contexts(one)
    except ConfigError as e:
        raise ConfigError(f"{args.config}: {e}" if args.config else str(e)) from None
    result = run(cfg)
    from kdaudit import distributed

    if not distributed.is_main():    # under a launcher, the main process reports
        return 0
    if result.families:
        for family, r in result.families.items():
            print(f"\n== {family}")
            _print_summary(r.audit, r.report)
        print(f"\nSuite report: {result.report['html']}\n              {result.report['md']}")
    else:
        _print_summary(result.audit, result.report)
    return 0


def _print_summary(audit, report: dict[str, Path]) -> None:
    from attacks.blind import CONFOUND_AUC

    summary = audit.summary()
    if summary.empty:
        print("\nNo model-based membership signal was run (only the model-free checks below).")
    else:
        print("\nMembership-inference AUC (members vs non-members; 0.5 = no signal):")
        print(summary.to_string(float_format=lambda v: f"{v:.3f}"))
    for name, auc in audit.split_check.items():
        flag = "  WARNING: the split looks shifted; membership results may be inflated" \
            if auc > CONFOUND_AUC else ""
        print(f"Split check ({name} baseline, no model): AUC {auc:.3f}{flag}")
    for note in audit.notes:
        print(f"Note: {note}")
    print(f"\nReport: {report['html']}\n        {report['md']}")


def _report(args: argparse.Namespace) -> int:
    from kdaudit import report_run

    redact = not args.show_secrets
    out = args.out or args.run_dir / ("report" if redact else "report-with-secrets")
    if not (args.run_dir / "manifest.json").exists():
        raise FileNotFoundError(f"{args.run_dir}: no manifest.json; is this a kdaudit run "
                                f"directory?")
    with FolderLock(out):
        paths = report_run(args.run_dir, redact=redact, out=out)
    print(f"Report: {paths['html']}\n        {paths['md']}")
    return 0


def _named(values: list[str] | None, flag: str) -> dict[str, str]:
    """Parse repeated NAME=PATH arguments."""
    out = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"{flag} {v!r}: expected NAME=PATH, e.g. {flag} kd=runs/x/models/kd")
        if name in out:
            raise ConfigError(f"{flag}: model name '{name}' given twice")
        out[name] = path
    return out


def _audit(args: argparse.Namespace) -> int:
    from kdaudit import audit_models
    from kdaudit.api import read_inclusion

    models = {"teacher": args.teacher} if args.teacher else {}
    students = _named(args.student, "--student")
    if "teacher" in students:
        raise ConfigError("--student: the name 'teacher' is reserved for --teacher")
    models.update(students)
    bases = {}
    if args.teacher_base and args.teacher:
        bases["teacher"] = args.teacher_base
    if args.student_base:
        bases.update({name: args.student_base for name in students})
    references: dict[str, list] = {}
    for v in args.reference or []:
        name, sep, rest = v.partition("=")
        path, _, mask = rest.partition(":")
        if not sep or name not in models or not path or not mask:
            raise ConfigError(f"--reference {v!r}: expected NAME=PATH:MASKFILE where NAME is "
                              f"an audited model ({sorted(models)}) and MASKFILE lists the "
                              f"record ids the reference was trained on")
        references.setdefault(name, []).append((path, read_inclusion(mask)))
    signals = [s.strip() for s in args.signals.split(",") if s.strip()] if args.signals else None
    cfg = AuditConfig(redact=not args.show_secrets, canary_candidates=args.canary_candidates)
    out = Path(args.out)
    with FolderLock(out):   # the output folder is writable and ours before any scoring
        result = audit_models(models, args.members, args.nonmembers, bases=bases,
                              signals=signals, config=cfg, references=references,
                              population=args.population, canaries=args.canaries,
                              external=args.external, max_length=args.max_length,
                              seed=args.seed, mapping=args.mapping)
        result.write_tables(out / "tables")
        report = result.write_report(
            out / "report", redact=cfg.redact,
            show_secrets_hint="kdaudit audit <the same arguments> --show-secrets")
    _print_summary(result, report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdaudit",
        description="Audit how much private fine-tuning data leaks from a teacher language "
                    "model into the students distilled from it.")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error or interrupt")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_run_parser, _add_audit_parser, add_teacher_parser, add_student_parser):
        add(sub)
    from kdaudit.dp.cli import add_privacy_parser

    add_privacy_parser(sub)
    _add_report_parser(sub)
    _add_benchmark_parser(sub)
    return parser


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not seeds:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return seeds


def _add_benchmark_parser(sub) -> None:
    """`kdaudit benchmark`: a suite of runs over seeds, summarised across them."""
    from kdaudit.benchmark import suites

    p = sub.add_parser("benchmark", help="run a benchmark suite over seeds and summarise it",
                       description="Run every (variant, seed) of a suite from "
                                   "benchmarks/suites/ (or a suite file), resuming where it "
                                   "stopped and skipping finished runs, then write the AUC "
                                   "spread across seeds and the paired tests against nokd.")
    p.add_argument("suite", help=f"a suite name ({', '.join(suites())}) or a suite file")
    p.add_argument("--seeds", type=_seed_list, default=None,
                   help="comma-separated seeds (default: the suite's)")
    p.add_argument("--out", type=Path, default=Path("runs/benchmarks"),
                   help="output folder (default runs/benchmarks)")
    p.add_argument("--publish", type=Path, metavar="DIR",
                   help="after the suite, copy its tables to DIR/<suite>/ and render the "
                        "reference report there (`make reports`: DIR = reports)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan (models, data, stages, steps, memory estimates, what "
                        "is finished) and check the config, without running or downloading")
    p.set_defaults(fn=_benchmark)


def _benchmark(args: argparse.Namespace) -> int:
    from kdaudit.benchmark import load_suite, plan, publish, run_suite

    suite = load_suite(args.suite)
    if args.dry_run:
        print(plan(suite, args.out, args.seeds))
        return 0
    for variant, path in run_suite(suite, args.out, args.seeds).items():
        print(f"{variant}: {path}\n         {path.with_suffix('.html')}")
    if args.publish:
        for variant, path in publish(suite, args.out, args.publish).items():
            print(f"published {variant}: {path}")
    return 0


def _add_run_parser(sub) -> None:
    """`kdaudit run`: the whole pipeline from a preset or a config file."""
    p = sub.add_parser("run", help="run the whole pipeline (data, teacher, students, attacks, "
                                   "report) from a preset or a config file",
                       description="Generate or load data, fine-tune the teacher on the "
                                   "members, distil the students, attack every model and write "
                                   "runs/<name>/report/. Finished stages are skipped when run "
                                   "again; an interrupted run resumes.")
    p.add_argument("--preset", default="demo", choices=presets(),
                   help="starting configuration (default: demo, the tiny recipe on half its "
                        "records)")
    p.add_argument("--config", type=Path, help="TOML file overriding preset fields")
    p.add_argument("--out", help="parent folder of the run directory (default: runs)")
    p.add_argument("--name", help="run name (default: the preset's)")
    p.add_argument("--seed", type=int, help="seed for data split, initialisation and order")
    add_dp_sgd_flags(p.add_argument_group("DP-SGD runs (DP students and their teachers)"))
    p.set_defaults(fn=_run)


def _add_audit_parser(sub) -> None:
    """`kdaudit audit`: attack models a user brings."""
    p = sub.add_parser("audit", help="attack models you bring (any Hugging Face causal LM "
                                     "folders or hub names) and write the risk report",
                       description="Score members and non-members under every model with every "
                                   "membership signal, measure memorization and write "
                                   "OUT/tables and OUT/report. All models must share one "
                                   "tokenizer (the first model's).")
    p.add_argument("--teacher", help="the teacher: a model folder or hub name")
    p.add_argument("--student", action="append", metavar="NAME=PATH",
                   help="a student (repeatable), e.g. --student kd=runs/x/models/kd; name the "
                        "no-teacher baseline 'nokd' to compare against it")
    p.add_argument("--teacher-base", metavar="PATH",
                   help="the teacher before fine-tuning (enables the ref_base signal)")
    p.add_argument("--student-base", metavar="PATH",
                   help="the students' common starting point (enables ref_base for them)")
    p.add_argument("--members", required=True, help="records the teacher was trained on "
                   "(.jsonl/.csv/.parquet, HF dataset folder or hub name)")
    p.add_argument("--nonmembers", required=True, help="held-out records of the same "
                   "distribution")
    p.add_argument("--reference", action="append", metavar="NAME=PATH:MASKFILE",
                   help="a reference model for audited model NAME (repeatable; LiRA and RMIA), "
                        "with a file of the record ids it was trained on")
    p.add_argument("--population", help="other records of the same distribution (RMIA)")
    p.add_argument("--canaries", help="canaries planted in the teacher's training data (a "
                   "run's data/canaries.jsonl): exposure and the one-run ε lower bound")
    p.add_argument("--canary-candidates", type=int, default=AuditConfig.canary_candidates,
                   help="random secrets each repeated canary is ranked against for exposure "
                        "(default %(default)s; match the run's audit.canary_candidates to "
                        "reproduce its numbers)")
    p.add_argument("--external", metavar="PATH",
                   help="an independently trained model (its own tokenizer): enables ref_ext")
    p.add_argument("--mapping", choices=["dolly", "alpaca", "kdaudit"],
                   help="column schema of the data files (guessed when omitted)")
    p.add_argument("--signals", help="comma-separated signal names (default: all that apply)")
    p.add_argument("--max-length", type=int, help="tokens per record (default: the smallest "
                   "context among the models; longer records lose the start of their prompt)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--out", default="audit", help="output folder (default: ./audit)")
    p.add_argument("--show-secrets", action="store_true",
                   help="do not redact private details in example text")
    p.set_defaults(fn=_audit)


def _add_report_parser(sub) -> None:
    """`kdaudit report`: rewrite a finished run's report."""
    p = sub.add_parser("report", help="(re)write the report of a finished run directory",
                       description="Rebuild report.html and report.md from the tables and "
                                   "scores of RUN_DIR without recomputing anything.")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--show-secrets", action="store_true",
                   help="do not redact private details in example text; written to "
                        "RUN_DIR/report-with-secrets/ so the redacted report stays as it is")
    p.add_argument("--out", type=Path, help="folder of the report (default RUN_DIR/report, "
                                            "or RUN_DIR/report-with-secrets)")
    p.set_defaults(fn=_report)


def _quiet_transformers() -> None:
    """Hide per-load progress bars and advisory warnings; kdaudit shows its own progress."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


RESUME_HINT = ("kdaudit: interrupted. Finished stages are saved: run the same command again "
               "to resume where it stopped.")


def main(argv: list[str] | None = None) -> int:
    """Run one command. A bad input or a busy or unwritable folder is one line on stderr and
    exit code 2; Ctrl-C (or SIGTERM) is the resume hint and 130. `--debug`, anywhere on the
    line, shows tracebacks."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    args.debug = debug
    _quiet_transformers()
    try:
        threads.govern()
        with _terminate_as_interrupt():
            return args.fn(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"\n{RESUME_HINT}", file=sys.stderr)
        return 130
    except (ConfigError, ValueError, OSError, FolderBusyError) as e:
        if args.debug:
            raise
        print(f"kdaudit: error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    """The error as the user should read it: an OSError names its file."""
    if isinstance(e, OSError) and e.filename and not isinstance(e, FileNotFoundError) \
            and str(e.filename) not in str(e.args[-1] if e.args else ""):
        return f"{e.filename}: {e.strerror or e}"
    return str(e)


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (a scheduler, `kill`) ends a run like Ctrl-C: the stage in progress cleans up
    its temporary files and the finished ones stay done."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:              # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
