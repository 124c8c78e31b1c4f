"""The suite page: one report over several model families (their heatmaps and links to each
family's report, then every model's strongest signal beside its utility)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from kdaudit.report.render import environment, heatmap_figures, unique_slug
from kdaudit.report.tables import (UTILITY_FORMATS, Table, fmt_ci, heatmap_order, model_order,
                                   num, utility_title)
from kdaudit.report.verdicts import MODEL_FREE_SIGNALS
from kdaudit.store import atomic_write_text


SUITE_UTILITY = (("perplexity", "nonmembers"), ("rouge_l", "nonmembers"))


def strongest_table(families: Mapping[str, Mapping[str, Any]]) -> Table:
    """Per family and model: the model-based signal with the highest AUC, with its CI, and
    the model's perplexity and ROUGE-L on non-members where the family reports them."""
    shown = [(m, s) for m, s in SUITE_UTILITY
             if any(_has_utility(d.get("utility"), m, s) for d in families.values())]
    rows = []
    for family, d in families.items():
        mia = d["mia"]
        auc = mia[(mia["metric"] == "auc") & (mia["model"] != "data")
                  & ~mia["signal"].isin(MODEL_FREE_SIGNALS)]
        auc = auc.assign(value=pd.to_numeric(auc["value"], errors="coerce")).dropna(
            subset=["value"])
        utility = d.get("utility")
        for model in heatmap_order(d.get("models"), model_order(d.get("models"), auc)):
            m = auc[auc["model"] == model]
            if m.empty:
                continue
            best = m.loc[m["value"].idxmax()]
            cells = [family, model, str(best["signal"]),
                     fmt_ci(best["value"], best.get("ci_low"), best.get("ci_high"))]
            for metric, split in shown:
                v = _utility_value(utility, model, metric, split)
                cells.append("—" if math.isnan(v)
                             else UTILITY_FORMATS.get(metric, "{:.2f}").format(v))
            rows.append(cells)
    return Table(["Family", "Model", "Strongest signal", "AUC (95% CI)",
                  *(utility_title(m, s) for m, s in shown)], rows)


def _has_utility(utility: pd.DataFrame | None, metric: str, split: str) -> bool:
    return (utility is not None and not utility.empty
            and bool(((utility["metric"] == metric) & (utility["split"] == split)).any()))


def _utility_value(utility: pd.DataFrame | None, model: str, metric: str, split: str) -> float:
    if not _has_utility(utility, metric, split):
        return math.nan
    v = utility[(utility["model"] == model) & (utility["metric"] == metric)
                & (utility["split"] == split)]["value"]
    return num(v.iloc[0]) if len(v) else math.nan


def write_suite_report(out_dir: str | os.PathLike[str], families: Mapping[str, Mapping[str, Any]],
                       *, title: str = "kdaudit suite report") -> dict[str, Path]:
    """One page over several model families: per family the AUC and TPR-at-1%-FPR heatmaps
    and a link to its own report, then each model's strongest signal beside its utility.

    `families` maps a family name to {"mia": DataFrame, "models": DataFrame, "utility":
    DataFrame (optional), "report": link to the family's report.html, relative to out_dir}.
    Returns the paths of report.html, report.md and the heatmaps ("<family>_heatmap_auc", …).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    sections = []
    taken: set[str] = set()
    for family, d in families.items():
        slug = unique_slug(family, taken)
        order = heatmap_order(d.get("models"), model_order(d.get("models"), d["mia"]))
        heatmaps, notes = heatmap_figures(d["mia"], order, out, paths, prefix=f"{slug}_",
                                    title=f"{family}: ")
        sections.append({"family": family, "anchor": slug, "report": d["report"],
                         "heatmaps": heatmaps, "heatmap_notes": notes})
    context = {"title": title, "families": sections, "strongest": strongest_table(families)}
    for key, autoescape in (("html", True), ("md", False)):
        text = environment(autoescape).get_template(f"suite.{key}.j2").render(**context)
        paths[key] = out / f"report.{key}"
        atomic_write_text(paths[key], text)
    return paths
