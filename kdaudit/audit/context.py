"""What an audit is about: the records under attack, each model's record, the shared
settings of one audit, and what auditing one model yields."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from kdaudit.audit.passes import ModelPass
from kdaudit.config import AuditConfig
from kdaudit.data.canaries import Canary
from kdaudit.data.records import Record


@dataclass
class ModelInfo:
    """One audited model: its id, role (teacher / student / baseline / base), base id, and the
    method and ε that made it (ε = ∞ for a model trained without DP). They are set where the
    model is named and travel as columns of the report's model table, never parsed from ids."""

    id: str
    role: str
    base: str | None = None
    description: str = ""
    method: str | None = None
    epsilon: float = math.inf
    private: bool = False       # trained by a DP recipe (its ε = ∞ variant included)


@dataclass
class AuditSet:
    """The records under attack: members (label 1) then non-members (label 0)."""

    members: list[Record]
    nonmembers: list[Record]

    @property
    def records(self) -> list[Record]:
        return self.members + self.nonmembers

    @property
    def labels(self) -> np.ndarray:
        return np.r_[np.ones(len(self.members)), np.zeros(len(self.nonmembers))].astype(int)

    def memorization_subset(self, n: int) -> list[int]:
        """Indices of the first n members and first n non-members (all where fewer)."""
        m = len(self.members)
        return list(range(min(n, m))) + list(range(m, m + min(n, len(self.nonmembers))))


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
