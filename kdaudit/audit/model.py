"""Auditing one model, the one orchestration `kdaudit.audit_models` and a run's stages share.

`audit_model` runs everything that needs the model itself (its passes, generations,
extraction, canaries, greedy answers) and returns a `ModelAudit`; `reference_pass` scores a
LiRA / RMIA reference model. `combine` then turns the audits of every model into the tables,
with no model loaded. The pipeline calls the same functions and only caches what they return.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from attacks.mia import ReferenceModels
from attacks.scoring import TokenStats
from kdaudit.audit.passes import ModelPass, compute_extraction, compute_generations, \
    compute_pass
from kdaudit.audit.privacy import canary_rows, heuristic_row, spent_delta, spent_rows
from kdaudit.audit.results import AuditResult, AuditSet, ModelInfo, assemble
from kdaudit.config import AuditConfig
from kdaudit.data.canaries import Canary
from kdaudit.data.records import Record

PRIVACY_COLUMNS = ["model", "metric", "value", "note"]


@dataclass
class AuditContext:
    """What every model of one audit is scored on, and how."""

    audit_set: AuditSet
    tokenizer: Any
    cfg: AuditConfig
    max_length: int
    seed: int = 0
    canaries: Sequence[Canary] = ()               # planted canaries: exposure, one-run ε
    population: Sequence[Record] | None = None    # other records of the distribution (RMIA)

    @property
    def memorization_records(self) -> list[Record]:
        subset = self.audit_set.memorization_subset(self.cfg.memorization_records)
        return [self.audit_set.records[i] for i in subset]

    @property
    def utility_records(self) -> list[Record]:
        """The non-members a model answers greedily for ROUGE-L."""
        return self.audit_set.nonmembers[:self.cfg.utility_records]


@dataclass
class ModelAudit:
    """What one model yields. `population`: its mean response log-probability on the RMIA
    population; generations, extraction and responses exist for trained models only."""

    scored: ModelPass
    population: np.ndarray | None = None
    generations: list[list[int]] | None = None
    extraction: pd.DataFrame | None = None       # record_id, targeted, sampled
    responses: list[str] | None = None           # greedy answers to ctx.utility_records
    privacy: list[dict] = field(default_factory=list)


def plain(cfg: AuditConfig) -> AuditConfig:
    """The audit config without extra passes: references need token statistics only."""
    return dataclasses.replace(cfg, signals=["loss"], block_risk=False)


def population_logq(ctx: AuditContext, model, desc: str) -> np.ndarray:
    """The model's mean response log-probability on each population record."""
    return -compute_pass(model, ctx.tokenizer, ctx.population, plain(ctx.cfg),
                         max_length=ctx.max_length, desc=f"{desc} population").stats.nll()


def audit_model(ctx: AuditContext, model_id: str, model, *, trained: bool,
                folder: str | Path | None = None, population: bool = False) -> ModelAudit:
    """Score, generate from and probe one model. `trained`: it saw the members (not a base),
    so its memorization, canaries and utility are measured; `folder` holds a kdaudit DP
    model's privacy.json; `population`: also score the RMIA population."""
    from kdaudit.utility import greedy_responses

    cfg, tok, n = ctx.cfg, ctx.tokenizer, ctx.max_length
    out = ModelAudit(compute_pass(model, tok, ctx.audit_set.records, cfg, max_length=n,
                                  desc=model_id))
    if population and ctx.population is not None:
        out.population = population_logq(ctx, model, model_id)
    out.privacy = spent_rows(model_id, folder) if folder is not None else []
    if not trained:
        return out
    records = ctx.memorization_records
    out.generations = compute_generations(model, tok, records, cfg, max_length=n,
                                          desc=f"generate {model_id}")
    out.extraction = compute_extraction(model, tok, records, cfg, max_length=n, seed=ctx.seed,
                                        desc=model_id)
    if ctx.canaries:
        out.privacy += canary_rows(model_id, model, tok, ctx.canaries,
                                   candidates=cfg.canary_candidates,
                                   k_fraction=cfg.canary_guess_fraction, max_length=n,
                                   batch_size=cfg.batch_size, seed=ctx.seed,
                                   delta=spent_delta(folder) if folder is not None else 0.0)
    out.privacy.append(heuristic_row(model_id, -out.scored.stats.nll(), ctx.audit_set.labels,
                                     ctx.seed, "loss"))
    if cfg.utility_records:
        out.responses = greedy_responses(model, tok, ctx.utility_records,
                                         max_new_tokens=cfg.utility_tokens,
                                         batch_size=cfg.batch_size, max_length=n)
    return out


def reference_pass(ctx: AuditContext, model, desc: str) -> ModelAudit:
    """A LiRA / RMIA reference model: token statistics on the audited records and, when the
    audit has a population, on the population."""
    out = ModelAudit(compute_pass(model, ctx.tokenizer, ctx.audit_set.records, plain(ctx.cfg),
                                  max_length=ctx.max_length, desc=desc))
    if ctx.population is not None:
        out.population = population_logq(ctx, model, desc)
    return out


def reference_models(ctx: AuditContext, target: ModelAudit,
                     references: Sequence[tuple[ModelAudit, set[str]]]) -> ReferenceModels:
    """LiRA / RMIA inputs from K scored references, each with the ids it trained on."""
    ids = [r.id for r in ctx.audit_set.records]
    pop = [ref.population for ref, _ in references]
    return ReferenceModels(np.array([-ref.scored.stats.nll() for ref, _ in references]),
                           np.array([[i in inside for i in ids] for _, inside in references],
                                    dtype=bool),
                           target.population,
                           np.array(pop) if all(p is not None for p in pop) and pop else None)


def combine(ctx: AuditContext, infos: Sequence[ModelInfo], audits: Mapping[str, ModelAudit], *,
            references: Mapping[str, ReferenceModels] | None = None,
            external: TokenStats | None = None, external_per_byte: bool = False,
            config: dict[str, Any] | None = None) -> AuditResult:
    """Every model's audit into the tables: signals, metrics, memorization, privacy, utility."""
    from kdaudit.utility import utility_rows

    gens = {k: a.generations for k, a in audits.items() if a.generations is not None}
    extraction = {k: a.extraction for k, a in audits.items() if a.extraction is not None}
    result = assemble(infos, ctx.audit_set, {k: a.scored for k, a in audits.items()}, gens,
                      ctx.tokenizer, ctx.cfg, max_length=ctx.max_length, references=references,
                      external=external, external_per_byte=external_per_byte,
                      extraction=extraction, seed=ctx.seed, config=config)
    result.privacy = pd.DataFrame([row for i in infos for row in audits[i.id].privacy],
                                  columns=PRIVACY_COLUMNS)
    answered = ctx.utility_records
    result.utility = pd.concat(
        [result.utility] + [pd.DataFrame(utility_rows(i.id, audits[i.id].responses,
                                                      [r.response for r in answered]))
                            for i in infos if audits[i.id].responses is not None],
        ignore_index=True)
    return result
