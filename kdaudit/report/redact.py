"""Redaction of private details in everything a report shows.

Two detectors work together: the `secrets` a record declares (exact strings, any case) and
patterns for the personal data that user records carry without declaring it: e-mail
addresses, phone numbers, full dates (dates of birth), US street addresses with their
city/state/ZIP line, and runs of six or more digits (account, card and ID numbers). Names,
medical details and other free text have no reliable pattern: declare them as `secrets`.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from faker.providers.address.en_US import Provider as _USAddress

from kdaudit.report.tables import EXAMPLE_CHARS, clip

REDACTED = "[REDACTED]"
TEXT_FIELDS = ("instruction", "reference", "generation")

_MONTH = (r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
          r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)")
_SUFFIX = "|".join(sorted({*_USAddress.street_suffixes, "St", "Ave", "Rd", "Blvd", "Dr", "Ln",
                           "Ct", "Pl", "Ter", "Hwy", "Pkwy", "Sq", "Cir", "Trl", "Way"},
                          key=len, reverse=True))
_STATE = "|".join(_USAddress.states_abbr)

# (kind, pattern), in the order they are tried at each position of the text
PII_PATTERNS: tuple[tuple[str, str], ...] = (
    ("e-mail address", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"),
    ("date", rf"\b{_MONTH}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}}\b"
             rf"|\b\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?{_MONTH}\.?,?\s+\d{{4}}\b"
             r"|\b\d{4}-\d{1,2}-\d{1,2}\b|\b\d{1,2}[/.-]\d{1,2}[/.-](?:\d{4}|\d{2})\b"),
    ("phone number", r"(?<![\w+])(?:\+?\d{1,3}[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]"
                     r"\d{4}(?:\s?(?:x|ext\.?)\s?\d{1,6})?(?!\w)"
                     r"|(?<![\w+])\+\d{1,3}(?:[\s.-]?\(?\d{2,5}\)?){2,5}(?!\w)"),
    ("street address", rf"\b\d{{1,6}}\s+(?:[A-Z][A-Za-z'.-]*\s+){{1,4}}(?:{_SUFFIX})\b\.?"
                       r"(?:,?\s+(?:Apt\.?|Suite|Unit|#)\s*\w+)?"
                       r"|\bP\.?\s?O\.?\s+Box\s+\d+"
                       rf"|\b[A-Z][A-Za-z.'-]*(?:\s+[A-Z][A-Za-z.'-]*){{0,3}},\s+(?:{_STATE})"
                       r"\s+\d{5}(?:-\d{4})?\b"),
    ("long number", r"(?<![\w.])\d(?:[ -]?\d){5,}(?!\w)"),
)
_PII = re.compile("|".join(f"(?P<p{i}>{p})" for i, (_, p) in enumerate(PII_PATTERNS)))
PII_KINDS = tuple(kind for kind, _ in PII_PATTERNS)
DECLARED = "declared secret"


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
    """Replace every occurrence of a declared secret (case-insensitive) by "[REDACTED]".

    One regex pass with the longest secrets first, so that a secret contained in a longer
    one never leaves part of the longer one behind, and "[REDACTED]" itself is never
    rewritten.
    """
    pattern = _declared_pattern(secrets)
    return pattern.sub(REDACTED, text) if pattern is not None and text else text


def _declared_pattern(secrets: Iterable[str]) -> re.Pattern | None:
    unique = sorted({s for s in secrets if s and s.strip()}, key=len, reverse=True)
    if not unique:
        return None
    return re.compile("|".join(re.escape(s) for s in unique), re.IGNORECASE)


class Redactor:
    """Redacts the declared `secrets` and every detected personal detail (PII_PATTERNS)
    from the texts it is called on, and counts what it redacted per kind."""

    def __init__(self, secrets: Iterable[str] = ()):
        self.declared = _declared_pattern(secrets)
        self.counts: Counter = Counter()

    def __call__(self, text: str) -> str:
        if not text:
            return text
        if self.declared is not None:
            text, n = self.declared.subn(REDACTED, text)
            self.counts[DECLARED] += n
        return _PII.sub(self._hide, text)

    def _hide(self, m: re.Match) -> str:
        self.counts[PII_KINDS[int(m.lastgroup[1:])]] += 1
        return REDACTED

    def summary(self) -> str:
        return redaction_summary(self.counts)


def redaction_summary(counts: Counter) -> str:
    """One sentence: how many details of each kind the report's texts lost to redaction."""
    shown = [(k, counts[k]) for k in (DECLARED, *PII_KINDS) if counts.get(k)]
    if not shown:
        return "Nothing in the texts below matched a declared secret or a detector."
    parts = [f"{n} {kind}{'es' if n > 1 and kind.endswith('ss') else 's' if n > 1 else ''}"
             for kind, n in shown]
    return "Redacted: " + ", ".join(parts) + "."


def example_records(examples: pd.DataFrame | None, order: Sequence[str], *,
                    redactor: Redactor | None = None, per_model: int = 3
                    ) -> dict[str, list[dict[str, Any]]]:
    """Per model, the member records with the highest match rate (at most `per_model`).

    With a `redactor`, every shown text passes through it (built from the secrets of every
    audited record: a generation may leak another record's secret) and the secrets are not
    listed.
    """
    if examples is None or examples.empty:
        return {}
    df = examples
    if "split" in df and (df["split"] == "members").any():
        df = df[df["split"] == "members"]
    df = df.assign(_rate=pd.to_numeric(df["match_rate"], errors="coerce"))
    df = df.sort_values("_rate", ascending=False, kind="stable", na_position="last")
    chosen = {m: g.head(per_model) for m, g in df.groupby("model", sort=False)}
    out: dict[str, list[dict[str, Any]]] = {}
    for model in [*order, *(m for m in chosen if m not in order)]:
        group = chosen.get(model)
        if group is None:
            continue
        records = []
        for row in group.to_dict("records"):
            secrets = parse_secrets(row.get("secrets"))
            texts = {f: "" if _missing(row.get(f)) else str(row.get(f)) for f in TEXT_FIELDS}
            record_id = str(row.get("record_id", ""))
            if redactor is not None:
                texts = {f: redactor(t) for f, t in texts.items()}
                record_id = redactor(record_id)
            texts = {f: clip(t, EXAMPLE_CHARS) for f, t in texts.items()}   # after redaction
            rate = row["_rate"]
            records.append({
                "record_id": record_id,
                "match_rate": "n/a" if math.isnan(rate) else f"{rate:.3f}",
                **texts,
                "n_secrets": len(secrets),
                "secrets": [] if redactor is not None else secrets,
            })
        out[str(model)] = records
    return out


def _missing(x: object) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))
