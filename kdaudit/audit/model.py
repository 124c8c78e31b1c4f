"""Auditing one model, the one orchestration `kdaudit.audit_models` and a run's stages share.

`audit_model` runs everything that needs the model itself (its passes, generations,
extraction, canaries, greedy answers) and returns a `ModelAudit`; `reference_pass` scores a
LiRA / RMIA reference model and `external_pass` ref_ext's independent model.
`kdaudit.audit.results.assemble` then turns the audits of every model into the tables, with no
model loaded. The pipeline calls the same functions and only caches what they return.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from attacks.mia import ReferenceModels
from attacks.scoring import TokenStats
from kdaudit.audit.context import AuditContext, ModelAudit
from kdaudit.audit.passes import compute_extraction, compute_generations, compute_pass
from kdaudit.audit.privacy import canary_rows, heuristic_row, spent_delta, spent_rows
from kdaudit.config import AuditConfig


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
        out.privacy += canary_rows(model_id, model, tok, ctx.canaries, cfg, max_length=n,
                                   seed=ctx.seed,
                                   delta=spent_delta(folder) if folder is not None else 0.0)
    out.privacy.append(heuristic_row(model_id, -out.scored.stats.nll(), ctx.audit_set.labels,
                                     ctx.seed, "loss"))
    if cfg.utility_records:
        out.responses = greedy_responses(model, tok, ctx.utility_records,
                                         max_new_tokens=cfg.utility_tokens,
                                         batch_size=cfg.batch_size, max_length=n,
                                         desc=f"answer {model_id}")
    return out


def reference_pass(ctx: AuditContext, model, desc: str) -> ModelAudit:
    """A LiRA / RMIA reference model: token statistics on the audited records and, when the
    audit has a population, on the population."""
    out = ModelAudit(compute_pass(model, ctx.tokenizer, ctx.audit_set.records, plain(ctx.cfg),
                                  max_length=ctx.max_length, desc=desc))
    if ctx.population is not None:
        out.population = population_logq(ctx, model, desc)
    return out


def external_pass(ctx: AuditContext, model, tokenizer) -> tuple[TokenStats, bool]:
    """`ref_ext`'s independent model, scored with its own tokenizer: (its token statistics,
    whether they must be compared per byte because its tokenizer differs)."""
    own = dataclasses.replace(ctx, tokenizer=tokenizer, population=None)
    stats = reference_pass(own, model, "external").scored.stats
    return stats, tokenizer.get_vocab() != ctx.tokenizer.get_vocab()


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
