"""The audit stages: each model audited once by `kdaudit.audit.audit_model` (the function
`kdaudit.audit_models` calls), its artefacts cached in the run directory; then the tables
and the report from the cache."""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from attacks import parallel
from kdaudit import distributed
from kdaudit.audit import AuditContext, AuditResult, AuditSet, ModelAudit, ModelInfo, \
    ModelPass, assemble, audit_model, external_pass, extra_passes, reference_models, \
    reference_pass
from kdaudit.audit.inputs import truncation_note
from kdaudit.data.canaries import read_canaries
from kdaudit.models import compute_device, load_model, load_tokenizer
from kdaudit.pipeline import roster
from kdaudit.pipeline.stage import RunContext, Stage, versions
from kdaudit.store import atomic_write_frame, atomic_write_json, read_json

SHOW_SECRETS_RUN = "kdaudit report RUN_DIR --show-secrets (writes RUN_DIR/report-with-secrets/)"


def audit_context(run: RunContext) -> AuditContext:
    """The run's audit: members vs non-members, its canaries, and the validation split as the
    RMIA population (public records the target's training never used)."""
    cfg = run.cfg
    return AuditContext(AuditSet(run.split("members"), run.split("nonmembers")), run.tokenizer,
                        cfg.audit, cfg.data.max_length, cfg.seed,
                        read_canaries(run.dir.data("canaries")),
                        run.split("validation") if cfg.reference_models else None)


# -- the cache of one model's audit ---------------------------------------------------------
def save_audit(run: RunContext, ctx: AuditContext, model_id: str, audit: ModelAudit) -> None:
    d = run.dir
    d.stats(model_id).parent.mkdir(parents=True, exist_ok=True)
    audit.scored.save(d.stats(model_id))
    if audit.population is not None:
        np.save(d.stats(model_id, "population").with_suffix(".npy"), audit.population)
    if audit.generations is not None:
        atomic_write_frame(d.generations(model_id), audit.extraction.assign(
            tokens=audit.generations)[["record_id", "tokens", "targeted", "sampled"]])
    if audit.responses is not None:
        answered = ctx.utility_records
        atomic_write_frame(d.responses(model_id), pd.DataFrame(
            {"record_id": [r.id for r in answered], "response": audit.responses,
             "reference": [r.response for r in answered]}))
    atomic_write_json(d.privacy(model_id), audit.privacy)


def load_audit(run: RunContext, model_id: str) -> ModelAudit:
    d = run.dir
    out = ModelAudit(ModelPass.load(d.stats(model_id)))
    population = d.stats(model_id, "population").with_suffix(".npy")
    if population.exists():
        out.population = np.load(population)
    if d.generations(model_id).exists():
        frame = pd.read_parquet(d.generations(model_id))
        out.generations = [list(map(int, t)) for t in frame.tokens]
        out.extraction = frame[["record_id", "targeted", "sampled"]]
    if d.responses(model_id).exists():
        out.responses = list(pd.read_parquet(d.responses(model_id)).response)
    if d.privacy(model_id).exists():
        out.privacy = read_json(d.privacy(model_id))
    return out


def audit_outputs(run: RunContext, model_id: str, trained: bool) -> list[Path]:
    out = [run.dir.stats(model_id), run.dir.privacy(model_id)]
    if trained:
        out.append(run.dir.generations(model_id))
        if run.cfg.audit.utility_records:
            out.append(run.dir.responses(model_id))
    return out


# -- stages ---------------------------------------------------------------------------------
def _audited_everywhere(run: RunContext, model_id: str,
                        compute: Callable[[AuditContext, object], ModelAudit]) -> dict:
    """Load the model and `compute(ctx, model)` its audit. Under a launcher every process runs
    this: each scores and generates its share of the batches, all get the whole audit, the
    main process writes it."""
    ctx = audit_context(run)
    model = load_model(run.dir.model(model_id), device=compute_device())
    with parallel.sharded(distributed.scoring_shard()):
        audit = compute(ctx, model)
    if distributed.is_main():
        save_audit(run, ctx, model_id, audit)
    return {"tokens": int(len(audit.scored.stats.logprob))}


def make_model_audit(run: RunContext, model_id: str, trained: bool, population: bool) -> dict:
    """One of the run's models: its passes, generations, canaries and answers."""
    return _audited_everywhere(run, model_id, lambda ctx, model: audit_model(
        ctx, model_id, model, trained=trained, folder=run.dir.model(model_id),
        population=population))


def model_audit_stage(run: RunContext, info: ModelInfo, population: bool) -> Stage:
    """Audit one of the run's models (its passes, generations, canaries, answers)."""
    a, trained = run.cfg.audit, info.role != "base"
    inputs = {"model": run.hashes[info.id], "data": run.hashes["data"],
              "max_length": run.cfg.data.max_length, "seed": run.cfg.seed,
              "passes": sorted(extra_passes(a.signals)), "blocks": a.block_risk,
              "perturbations": [a.perturbations, a.perturbation_sigma],
              "trained": trained, "population": population}
    if trained:
        inputs.update(memorization=[a.memorization_tokens, a.memorization_records,
                                    a.extraction_samples],
                      canaries=[a.canary_candidates, a.canary_guess_fraction],
                      utility=[a.utility_records, a.utility_tokens])
    return Stage(f"audit:{info.id}", inputs, audit_outputs(run, info.id, trained),
                 partial(make_model_audit, run, info.id, trained, population),
                 every_process=True)


def make_reference_pass(run: RunContext, model_id: str) -> dict:
    """A reference model (or ref_ext, with its own tokenizer): token statistics only."""
    def compute(ctx, model):
        if model_id == "ref_ext":
            stats, _ = external_pass(ctx, model, load_tokenizer(run.dir.model(model_id)))
            return ModelAudit(ModelPass(stats))
        return reference_pass(ctx, model, model_id)

    return _audited_everywhere(run, model_id, compute)


def reference_stage(run: RunContext, model_id: str) -> Stage:
    return Stage(f"score:{model_id}", {"model": run.hashes[model_id], "data": run.hashes["data"],
                                       "max_length": run.cfg.data.max_length},
                 [run.dir.stats(model_id)], partial(make_reference_pass, run, model_id),
                 every_process=True)


def audit_stages(run: RunContext) -> list[Callable[[], Stage]]:
    """Builders of every audit stage: each audited model, each reference model, ref_ext."""
    refs = roster.reference_ids(run)
    stages = [partial(model_audit_stage, run, m, m.id in refs) for m in roster.models(run)]
    stages += [partial(reference_stage, run, r) for rs in refs.values() for r in rs]
    if run.cfg.models.external:
        stages.insert(0, partial(reference_stage, run, "ref_ext"))
    return stages


def training_table(run: RunContext, models: list[ModelInfo]) -> pd.DataFrame:
    """Every trained model's training log (loss and the method's parts per step)."""
    frames = []
    for m in models:
        log = run.dir.model(m.id) / "train_log.jsonl"
        if m.role != "base" and log.exists():
            rows = [json.loads(line) for line in log.read_text().splitlines() if line]
            frames.append(pd.DataFrame(rows).assign(model=m.id))
    if not frames:
        return pd.DataFrame(columns=["model", "step", "loss"])
    table = pd.concat(frames, ignore_index=True)
    return table[["model", *[c for c in table.columns if c != "model"]]]


def assemble_run(run: RunContext) -> AuditResult:
    """The run's tables from the cached audits (no model is loaded)."""
    ctx, models = audit_context(run), roster.models(run)
    audits = {m.id: load_audit(run, m.id) for m in models}
    refs = {target: reference_models(ctx, audits[target], [
        (load_audit(run, ref), {r.id for r in run.split(f"reference_{k}")})
        for k, ref in enumerate(ids)]) for target, ids in roster.reference_ids(run).items()}
    external = None
    if run.cfg.models.external:
        other = load_tokenizer(run.dir.model("ref_ext"))
        external = (load_audit(run, "ref_ext").scored.stats,
                    other.get_vocab() != run.tokenizer.get_vocab())
    result = assemble(ctx, models, audits, references=refs, external=external,
                      config=run.cfg.to_dict())
    result.training = training_table(run, models)
    truncated = truncation_note(ctx.audit_set.records, run.tokenizer, run.cfg.data.max_length,
                                "the run's data.max_length")
    result.notes = [truncated] if truncated else []
    return result


def make_tables(run: RunContext, holder: dict) -> dict:
    result = assemble_run(run)
    result.write_tables(run.dir.root / "tables")
    for model_id, frame in result.scores.items():
        atomic_write_frame(run.dir.scores(model_id), frame)
    holder["result"] = result
    return {}


def tables_stage(run: RunContext, holder: dict) -> Stage:
    upstream = {k: v for k, v in run.hashes.items() if ":" in k}
    return Stage("audit", {"upstream": upstream, "audit": run.cfg.audit.__dict__},
                 [run.dir.table("mia")], partial(make_tables, run, holder))


def make_report(run: RunContext, result: AuditResult, paths: dict) -> dict:
    info = {"run": run.cfg.name, "seed": run.cfg.seed,
            "stage seconds": {k: v.get("seconds") for k, v in
                              run.manifest.data["stages"].items()},
            "versions": versions()}
    paths.update(result.write_report(run.dir.report, title=f"kdaudit risk report: "
                                     f"{run.cfg.name}", run_info=info,
                                     redact=run.cfg.audit.redact,
                                     show_secrets_hint=SHOW_SECRETS_RUN))
    return {}


def report_stage(run: RunContext, result: AuditResult, paths: dict) -> Stage:
    return Stage("report", {"audit": run.hashes["audit"], "redact": run.cfg.audit.redact},
                 [run.dir.report / "report.html", run.dir.report / "report.md"],
                 partial(make_report, run, result, paths))
