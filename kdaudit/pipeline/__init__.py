"""A run: data → tokenizer → bases → teacher → students (→ reference models, DP students) →
one audit per model → tables → report, each step a `Stage` (see `stage.py`) whose inputs are
hashed, so a second identical command skips it and an interrupted one resumes.

The stages are module-level functions over a `RunContext`: `prepare` (data, tokenizer,
bases), `training`, `private` (DP), `scoring` (audits, tables, report); `roster` says which
models a run has.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kdaudit import distributed, seeds
from kdaudit.audit import AuditResult
from kdaudit.config import ConfigError, RunConfig
from kdaudit.pipeline import prepare, roster, scoring
from kdaudit.pipeline.private import dp_stages
from kdaudit.pipeline.stage import Log, RunContext, Stage, execute
from kdaudit.pipeline.training import train_stage
from kdaudit.store import FolderLock
from kdaudit.train.methods import METHODS

__all__ = ["RunContext", "RunResult", "Stage", "execute", "run", "run_one"]


@dataclass
class RunResult:
    """A finished run: its folder, audit tables and report; a run over several model families
    has no audit of its own, one RunResult per family and a suite report instead."""

    run_dir: Path
    report: dict[str, Path]
    audit: AuditResult | None = None
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    families: dict[str, "RunResult"] = field(default_factory=dict)


def training_stages(run: RunContext) -> list[Callable[[], Stage]]:
    """Builders of the teacher's, the students' and the reference models' stages, in order
    (each is built when its turn comes: it hashes its upstream stages)."""
    out: list[Callable[[], Stage]] = [lambda: train_stage(run, "teacher", "sft", "members")]
    for method in roster.student_order(roster.public_methods(run)):
        teacher = "teacher" if METHODS[method].needs_teacher else None
        out.append(lambda m=method, t=teacher: train_stage(run, m, m, "public", teacher_id=t))
    for k in range(run.cfg.reference_models):
        seed = seeds.reference_model(run.cfg.seed, k)
        out.append(lambda k=k, s=seed: train_stage(run, f"ref_teacher_{k}", "sft",
                                                   f"reference_{k}", seed=s))
        for method in roster.public_methods(run):
            if METHODS[method].needs_teacher:
                out.append(lambda m=method, k=k, s=seed: train_stage(
                    run, f"ref_{m}_{k}", m, "public", teacher_id=f"ref_teacher_{k}", seed=s))
    return out


def run_one(cfg: RunConfig, log: Log = print) -> RunResult:
    """Run (or resume) every stage of one model family's run."""
    run = RunContext(cfg, log)
    run.record_config()
    stages = [lambda: prepare.data_stage(run), lambda: prepare.tokenizer_stage(run),
              lambda: prepare.base_stage(run, "base_teacher", cfg.models.teacher),
              lambda: prepare.base_stage(run, "base_student", cfg.models.student)]
    if cfg.models.external:
        stages.append(lambda: prepare.external_stage(run))
    stages += training_stages(run)
    for build in stages:
        execute(run, build())
    for build in [*dp_stages(run), *scoring.audit_stages(run)]:
        execute(run, build())
    holder: dict[str, AuditResult] = {}
    execute(run, scoring.tables_stage(run, holder))
    result = holder.get("result") or scoring.assemble_run(run)
    paths: dict[str, Path] = {}
    execute(run, scoring.report_stage(run, result, paths))
    paths = paths or {"html": run.dir.report / "report.html", "md": run.dir.report / "report.md"}
    return RunResult(run.dir.root, paths, result, dict(run.manifest.data["stages"]))


def run(cfg: RunConfig, log: Log = print) -> RunResult:
    """Run (or resume) the whole pipeline for `cfg`. A config with `families` runs each
    family in `<run_dir>/<family>` and adds a suite report. The run folder is locked
    (`FolderLock`) for the whole run: a second run on it is refused, naming this one's pid."""
    for one in [cfg.for_family(f) for f in cfg.families] or [cfg]:
        check_contexts(one)
        check_launch(one)
    with FolderLock(cfg.run_dir) if distributed.is_main() else contextlib.nullcontext():
        if not cfg.families:
            return run_one(cfg, log)
        results = {}
        for family in cfg.families:
            log(f"== family {family}")
            results[family] = run_one(cfg.for_family(family), log)
        return RunResult(cfg.run_dir, write_suite(cfg, results), families=results)


def model_context(name: str) -> int | None:
    """The longest input (tokens) of a zoo preset or a local model folder; None when unknown
    without a download (a hub name)."""
    from kdaudit.models.zoo import ZOO

    if name in ZOO:
        return ZOO[name].max_positions
    config = Path(name) / "config.json"
    if config.is_file():
        c = json.loads(config.read_text())
        return c.get("n_positions") or c.get("max_position_embeddings")
    return None


def check_contexts(cfg: RunConfig) -> None:
    """Before any stage: `data.max_length` fits the teacher's and the student's context, and
    the methods that sample responses leave room in it for a prompt."""
    from kdaudit.train.methods import METHODS

    for role in ("teacher", "student"):
        name = getattr(cfg.models, role)
        context = model_context(name)
        if context is not None and cfg.data.max_length > context:
            raise ConfigError(f"data.max_length: {cfg.data.max_length} tokens exceed the "
                              f"{context}-token context of models.{role} = {name!r}")
    sampling = [m for m in cfg.methods if m in METHODS and METHODS[m].data != "ground_truth"]
    if sampling and cfg.kd.max_new_tokens >= cfg.data.max_length:
        raise ConfigError(f"kd.max_new_tokens: {cfg.kd.max_new_tokens} sampled tokens leave no "
                          f"room for a prompt within data.max_length = {cfg.data.max_length} "
                          f"(methods {sampling} sample responses); expected fewer than "
                          f"{cfg.data.max_length}")


def check_launch(cfg: RunConfig) -> None:
    """Before any stage: under an FSDP launch config no method trains with DP-SGD, which
    runs under DDP only (Opacus's DPDDP)."""
    import os

    from kdaudit.train.methods import METHODS

    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() not in ("1", "true"):
        return
    private = [m for m in cfg.methods if m in METHODS and METHODS[m].privacy]
    if private:
        raise ConfigError(f"methods {private} train with DP-SGD, which runs under DDP "
                          f"(Opacus's DPDDP), not FSDP: run them in a launch without an FSDP "
                          f"config (e.g. benchmarks/accelerate/cpu_2proc.yaml's DDP)")


def write_suite(cfg: RunConfig, results: dict[str, RunResult]) -> dict[str, Path]:
    """The suite report: per family, the leakage heatmaps and a link to its own report."""
    from kdaudit.report import write_suite_report

    families = {f: {"mia": r.audit.mia, "models": r.audit.models, "utility": r.audit.utility,
                    "report": f"../{f}/report/report.html"} for f, r in results.items()}
    return write_suite_report(cfg.run_dir / "report", families,
                              title=f"kdaudit suite report: {cfg.name}")
