"""Example generations for the report, with the records' secrets redacted."""
from __future__ import annotations

import json
import math
import re
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

REDACTED = "[REDACTED]"
TEXT_FIELDS = ("instruction", "reference", "generation")


def parse_secrets(value: object) -> list[str]:
    """The secrets of one record as a list of strings, whatever the table's round trip made
    of them (a list, a numpy array from parquet, a JSON string from CSV, None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.startswith("["):
            try:
                return [str(s) for s in json.loads(stripped)]
            except json.JSONDecodeError:
                return [value]          # not a JSON list: the whole string is one secret
        return [value] if stripped else []
    if isinstance(value, (list, tuple, np.ndarray, pd.Series)):
        return [str(s) for s in value if s is not None]
    return [str(value)]


def redact(text: str, secrets: Iterable[str]) -> str:
    """Replace every occurrence of a secret (case-insensitive) by "[REDACTED]".

    One regex pass with the longest secrets first, so that a secret contained in a longer
    one never leaves part of the longer one behind, and "[REDACTED]" itself is never
    rewritten.
    """
    unique = sorted({s for s in secrets if s and s.strip()}, key=len, reverse=True)
    if not unique or not text:
        return text
    pattern = re.compile("|".join(re.escape(s) for s in unique), re.IGNORECASE)
    return pattern.sub(REDACTED, text)


def example_records(examples: pd.DataFrame | None, order: Sequence[str], *,
                    redact_secrets: bool = True, per_model: int = 3
                    ) -> dict[str, list[dict[str, Any]]]:
    """Per model, the member records with the highest match rate (at most `per_model`).

    With `redact_secrets`, every secret of any shown record is redacted from every shown
    text (a generation may leak another record's secret), and the secrets are not listed.
    """
    if examples is None or examples.empty:
        return {}
    df = examples
    if "split" in df and (df["split"] == "members").any():
        df = df[df["split"] == "members"]
    df = df.assign(_rate=pd.to_numeric(df["match_rate"], errors="coerce"))
    df = df.sort_values("_rate", ascending=False, kind="stable", na_position="last")
    chosen = {m: g.head(per_model) for m, g in df.groupby("model", sort=False)}
    all_secrets = [s for g in chosen.values()
                   for v in g.get("secrets", pd.Series(dtype=object)) for s in parse_secrets(v)]
    out: dict[str, list[dict[str, Any]]] = {}
    for model in [*order, *(m for m in chosen if m not in order)]:
        group = chosen.get(model)
        if group is None:
            continue
        records = []
        for row in group.to_dict("records"):
            secrets = parse_secrets(row.get("secrets"))
            texts = {f: "" if _missing(row.get(f)) else str(row.get(f)) for f in TEXT_FIELDS}
            if redact_secrets:
                texts = {f: redact(t, all_secrets) for f, t in texts.items()}
            rate = row["_rate"]
            records.append({
                "record_id": str(row.get("record_id", "")),
                "match_rate": "n/a" if math.isnan(rate) else f"{rate:.3f}",
                **texts,
                "n_secrets": len(secrets),
                "secrets": [] if redact_secrets else secrets,
            })
        out[str(model)] = records
    return out


def _missing(x: object) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))
