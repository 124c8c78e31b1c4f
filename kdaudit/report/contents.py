"""What a report shows: an audit's tidy tables. `kdaudit.audit.AuditResult` is one of these
(with its per-record scores); a report can also be written from any subset of the tables."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

Curves = Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]]


@dataclass
class ReportTables:
    """`mia` is required; a missing table is said so in the report. `models` has one row per
    model (model, role, base, description, method, epsilon, private; optionally family).
    `training` has one row per logged training step (model, step, loss, plus the numeric
    parts a method logs). `notes` are facts about the inputs stated at the top (truncation,
    …); `secrets` are declared secrets redacted wherever they appear."""

    mia: pd.DataFrame
    roc: Curves = field(default_factory=dict)
    memorization: pd.DataFrame | None = None
    utility: pd.DataFrame | None = None
    examples: pd.DataFrame | None = None
    models: pd.DataFrame | None = None
    signals: pd.DataFrame | None = None
    blocks: pd.DataFrame | None = None
    privacy: pd.DataFrame | None = None
    riskiest: pd.DataFrame | None = None
    training: pd.DataFrame | None = None
    config: Mapping[str, Any] | None = None
    notes: Sequence[str] = ()
    secrets: Sequence[str] = field(default=(), repr=False)
