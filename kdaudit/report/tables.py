"""Pivot the audit's tidy tables into display tables of formatted strings.

Every table here is a `Table` of strings, rendered unchanged by both templates (HTML
escapes it, Markdown escapes pipes), so a number reads the same in report.html and report.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import pandas as pd

from attacks.metrics import FPR_TARGETS
from attacks.mia import SIGNALS
from kdaudit.report.verdicts import MODEL_FREE_SIGNALS, SignalCheck

TPR_METRICS = {key: f"TPR @ {label} FPR" for key, _, label in FPR_TARGETS}

# (metric, split, column title, format) of the memorization table, in display order.
MEMORIZATION_COLUMNS = [
    ("match_rate", "members", "Match rate (members)", "{:.3f}"),
    ("match_rate", "nonmembers", "Match rate (non-members)", "{:.3f}"),
    ("match_rate", "gap", "Gap", "{:+.3f}"),
    ("longest_prefix", "members", "Longest prefix, tokens (members)", "{:.1f}"),
    ("fully_extracted", "members", "Fully extracted (members)", "{:.3f}"),
    ("secret_extraction", "members", "Secret extraction (members)", "{:.3f}"),
]



@dataclass
class Table:
    """Column titles and rows of display strings; `row_classes` are CSS classes per row."""

    columns: list[str]
    rows: list[list[str]]
    row_classes: list[str] = field(default_factory=list)

    def to_markdown(self) -> str:
        """A GitHub-flavoured pipe table."""
        lines = ["| " + " | ".join(md_cell(c) for c in self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(md_cell(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines)


def md_cell(text: object) -> str:
    """Make text safe inside a Markdown table cell (pipes, newlines, raw HTML)."""
    s = str(text).replace("\\", "\\\\").replace("|", "\\|")
    s = s.replace("<", "&lt;").replace(">", "&gt;")
    return " ".join(s.split())


CELL_CHARS = 300       # a record's text in a table cell
EXAMPLE_CHARS = 2000   # a record's text in an example block


def clip(text: str, limit: int) -> str:
    """`text`, cut at `limit` characters with how much was left out said at the end."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]} … [{len(text) - limit:,} more characters]"


def missing(x: object) -> bool:
    """True for None and float NaN."""
    return x is None or (isinstance(x, float) and math.isnan(x))


def num(x: object) -> float:
    """A float, with None / NaN / non-numbers as NaN."""
    try:
        return float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def fmt_ci(value: object, lo: object = None, hi: object = None, *, pct: bool = False,
           digits: int = 2) -> str:
    """"0.66 [0.63, 0.69]" (or "12.5% [8.0%, 16.0%]" with pct); "n/a" for NaN."""
    v, lo_, hi_ = num(value), num(lo), num(hi)
    if math.isnan(v):
        return "n/a"

    def f(x: float) -> str:
        return f"{100 * x:.{max(digits - 1, 0)}f}%" if pct else f"{x:.{digits}f}"

    if math.isnan(lo_) or math.isnan(hi_):
        return f(v)
    return f"{f(v)} [{f(lo_)}, {f(hi_)}]"


def unreachable(n_nonmembers: object) -> str:
    """The cell of a TPR that could not be reached: "n/a (min FPR 0.5%)", the smallest FPR
    one false positive among the non-members gives."""
    n = num(n_nonmembers)
    if n > 0:
        return f"n/a (min FPR {100 / n:.2g}%)"
    return "n/a (not reachable)"


def ordered(values: Iterable[object]) -> list[str]:
    """Unique values as strings, in order of first appearance."""
    return [str(v) for v in dict.fromkeys(values)]


def model_order(models: pd.DataFrame | None, *frames: pd.DataFrame | None) -> list[str]:
    """Models in the display order of `models`, then any others the tables mention."""
    names = [] if models is None or models.empty else ordered(models["model"])
    for frame in frames:
        if frame is not None and not frame.empty and "model" in frame:
            names += [m for m in ordered(frame["model"]) if m not in names]
    return names


def signal_order(names: Iterable[object]) -> list[str]:
    """Signal names in registry order (`attacks.mia.SIGNALS`), unknown names after them in
    order of first appearance, so every report lists signals the same way."""
    names = ordered(names)
    rank = {s: i for i, s in enumerate(SIGNALS)}
    return sorted(names, key=lambda s: (rank.get(s, len(rank)), names.index(s)))


# Heatmap rows: the teacher, then the no-KD baseline, then the students; anything else
# (base models, reference models) after them, each group in the given order.
ROLE_RANK = {"teacher": 0, "baseline": 1, "student": 2}


def heatmap_order(models: pd.DataFrame | None, order: Sequence[str]) -> list[str]:
    """`order` regrouped by role (teacher, baseline, students, others); unchanged without a
    role column."""
    if models is None or models.empty or "role" not in models:
        return list(order)
    roles = {str(m): str(r) for m, r in zip(models["model"], models["role"])}
    return sorted(order, key=lambda m: ROLE_RANK.get(roles.get(m, ""), len(ROLE_RANK)))


def heatmap_grid(mia: pd.DataFrame, metric: str, order: Sequence[str],
                 signals: Sequence[str]) -> pd.DataFrame:
    """Model × signal values of one metric, the numbers behind a leakage heatmap.

    Rows: the models of `order` that have any row for `metric` (the model-free "data"
    pseudo-model left out); columns: the `signals` that appear, model-free ones left out.
    A missing or unreachable value stays NaN, so a figure and its table show the same grid.
    """
    rows = mia[(mia["metric"] == metric) & (mia["model"].astype(str) != "data")]
    rows = rows.assign(model=rows["model"].astype(str), signal=rows["signal"].astype(str))
    present = set(rows["signal"])
    cols = [s for s in signals if s in present and s not in MODEL_FREE_SIGNALS]
    models = [m for m in order if m in set(rows["model"])]
    if not cols or not models:
        return pd.DataFrame(index=pd.Index(models, name="model"),
                            columns=pd.Index(cols, name="signal"), dtype=float)
    values = rows.drop_duplicates(["model", "signal"]).pivot(index="model", columns="signal",
                                                             values="value")
    return values.reindex(index=models, columns=cols).apply(pd.to_numeric, errors="coerce")


def results_table(mia: pd.DataFrame, checks: Sequence[SignalCheck],
                  order: Sequence[str]) -> Table:
    """Model × signal: AUC with CI, TPR at 1% and 0.1% FPR, sample sizes, elevated or not."""
    elevated = {(c.model, c.signal): c.elevated for c in checks}
    signals = ordered(mia["signal"])
    by_key = {k: g for k, g in mia.groupby(["model", "signal"], sort=False)}
    has_notes = False
    rows, classes = [], []
    for model in order:
        for signal in signals:
            group = by_key.get((model, signal))
            if group is None:
                continue
            metric = {str(r.metric): r for r in group.itertuples()}
            auc = metric.get("auc")
            cells = [model, signal, SIGNALS[signal].access_short if signal in SIGNALS else "",
                     "—" if auc is None else fmt_ci(auc.value, auc.ci_low, auc.ci_high)]
            for name in TPR_METRICS:
                r = metric.get(name)
                if r is None:
                    cells.append("—")
                elif math.isnan(num(r.value)):
                    cells.append(unreachable(r.n_nonmembers))
                else:
                    cells.append(fmt_ci(r.value, r.ci_low, r.ci_high, pct=True))
            first = group.iloc[0]
            cells.append(f"{_count(first['n_members'])} / {_count(first['n_nonmembers'])}")
            if signal in MODEL_FREE_SIGNALS:
                cells.append("— (model-free)")
            else:
                cells.append("yes" if elevated.get((model, signal)) else "no")
            notes = ordered(str(r.note) for r in group.itertuples()
                            if not missing(r.note) and str(r.note).strip()
                            and not math.isnan(num(r.value)))
            has_notes = has_notes or bool(notes)
            cells.append("; ".join(notes))
            rows.append(cells)
            classes.append("elevated" if elevated.get((model, signal)) else "")
    columns = ["Model", "Signal", "Access", "AUC [95% CI]", *TPR_METRICS.values(),
               "n (members / non-members)", "Elevated", "Notes"]
    if not has_notes:
        columns, rows = columns[:-1], [r[:-1] for r in rows]
    return Table(columns, rows, classes)


def _count(x: object) -> str:
    n = num(x)
    return "?" if math.isnan(n) else str(int(n))


def memorization_table(memorization: pd.DataFrame | None,
                       order: Sequence[str]) -> Table | None:
    """Rows: models. Columns: the MEMORIZATION_COLUMNS present, then any other metric."""
    if memorization is None or memorization.empty:
        return None
    values = {(str(r.model), str(r.metric), str(r.split)): r.value
              for r in memorization.itertuples()}
    present = {(metric, split) for _, metric, split in values}
    columns = [(m, s, title, f) for m, s, title, f in MEMORIZATION_COLUMNS if (m, s) in present]
    known = {m for m, *_ in MEMORIZATION_COLUMNS}
    extra = [(m, s) for m, s in dict.fromkeys(zip(memorization["metric"].astype(str),
                                                  memorization["split"].astype(str)))
             if m not in known]
    columns += [(m, s, f"{m.replace('_', ' ').capitalize()} ({s})", "{:.3f}") for m, s in extra]
    rows = []
    for model in order:
        if not any(k[0] == model for k in values):
            continue
        cells = [model]
        for metric, split, _, fmt in columns:
            v = num(values.get((model, metric, split)))
            cells.append("—" if math.isnan(v) else fmt.format(v))
        rows.append(cells)
    return Table(["Model", *(title for *_, title, _ in columns)], rows)


UTILITY_NAMES = {"perplexity": "Perplexity", "rouge_l": "ROUGE-L"}
# ROUGE-L is a fraction in [0, 1]: three decimals, as methods often differ by less than 0.01.
UTILITY_FORMATS = {"perplexity": "{:.2f}", "rouge_l": "{:.3f}"}


def utility_title(metric: str, split: str) -> str:
    """"Perplexity (non-members)", "ROUGE-L (non-members)", "Other metric (split)"."""
    name = UTILITY_NAMES.get(metric, metric.replace("_", " ").capitalize())
    return f"{name} ({split.replace('nonmembers', 'non-members')})"


def utility_table(utility: pd.DataFrame | None, order: Sequence[str]) -> Table | None:
    """Rows: models. One column per (metric, split), e.g. "Perplexity (non-members)" and
    "ROUGE-L (non-members)", so each model's quality sits on one line."""
    if utility is None or utility.empty:
        return None
    keys = list(dict.fromkeys(zip(utility["metric"].astype(str), utility["split"].astype(str))))
    values = {(str(r.model), str(r.metric), str(r.split)): num(r.value)
              for r in utility.itertuples()}
    rows = []
    for model in order:
        if not any(k[0] == model for k in values):
            continue
        cells = [model]
        for metric, split in keys:
            v = values.get((model, metric, split), math.nan)
            fmt = UTILITY_FORMATS.get(metric, "{:.2f}")
            cells.append("—" if math.isnan(v) else fmt.format(v))
        rows.append(cells)
    return Table(["Model", *(utility_title(m, s) for m, s in keys)], rows)
