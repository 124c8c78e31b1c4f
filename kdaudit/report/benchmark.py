"""The reference report of a benchmark suite: one variant's runs across seeds, rendered from
its tables alone (`tables/*.csv` and `meta.json`, written by `kdaudit.across_seeds`), so
that a checked-in report can be rebuilt and checked for staleness without any model.

    write_benchmark_report(folder)  # → folder/report.md, report.html, figures/*.png

report.md reads well on a code-hosting site (PNG figures beside it); report.html is the same
document in one self-contained file (figures inlined), rendered by markdown-it with raw HTML
disabled, so no table value can inject markup.
"""
from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd

from kdaudit.report import plots
from kdaudit.report.frontier import eps_label, frontier_points, has_dp
from kdaudit.report.render import config_text, fence
from kdaudit.report.tables import (Table, heatmap_order, md_cell, memorization_table,
                                   model_order, signal_order, utility_table)
from kdaudit.store import atomic_write_json, atomic_write_text

TABLES = ("metrics", "paired_tests", "teacher_to_student", "auc_by_category", "roc", "utility",
          "memorization", "privacy", "blocks", "models", "runs")
SPREAD = "min–max over seeds"
FIGURES_INDEX = "figures.json"


def load(folder: Path) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    """(meta.json, every table of `TABLES` that exists, empty frames for the others)."""
    meta = json.loads((folder / "meta.json").read_text())
    tables = {}
    for name in TABLES:
        path = folder / "tables" / f"{name}.csv"
        tables[name] = pd.read_csv(path) if path.exists() and path.stat().st_size > 1 \
            else pd.DataFrame()
    return meta, tables


def _as_mia(metrics: pd.DataFrame) -> pd.DataFrame:
    """The across-seed metrics in the shape of a run's mia table: value = the mean over
    seeds, ci_low / ci_high = the seeds' min and max."""
    if metrics.empty:
        return pd.DataFrame(columns=["model", "signal", "metric", "value", "ci_low", "ci_high"])
    return metrics.assign(value=metrics["mean"], ci_low=metrics["low"], ci_high=metrics["high"])


def _mean_as_value(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(value=frame["mean"]) if not frame.empty else frame


def seeds_phrase(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _pm(mean: float, sd: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if math.isnan(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _students(models: pd.DataFrame, tests: pd.DataFrame, *, private: bool = False
              ) -> list[str]:
    """Distilled students in model order: the non-private ones (the KD methods), or with
    `private` every student, DP ones included. Without a model table: the tested models,
    DP variants ("@ε") counted as private."""
    if not models.empty and {"role", "private"} <= set(models):
        return [str(m) for m, r, p in zip(models["model"], models["role"], models["private"])
                if r == "student" and (private or not bool(p))]
    return [str(m) for m in dict.fromkeys(tests.get("model", []))
            if private or "@" not in str(m)]


# -- sections ------------------------------------------------------------------------------------
def executive_summary(t: Mapping[str, pd.DataFrame]) -> list[str]:
    """Which student leaks most, by how much above the nokd floor, whether each KD method
    leaks more than nokd across the seeds, and what to do."""
    metrics, tests = t["metrics"], t["paired_tests"]
    auc = metrics[metrics["metric"] == "auc"] if not metrics.empty else metrics
    students = auc[auc["model"].isin(_students(t["models"], tests, private=True))] \
        if not auc.empty else auc
    if students.empty:
        return ["- No student models in this suite."]
    top = students.loc[students["mean"].idxmax()]
    over = "one seed" if int(top.seeds) == 1 else f"mean ± sd over {int(top.seeds)} seeds"
    lines = [f"- The student that leaks most is **{top.model}**: AUC {_pm(top['mean'], top.sd)} "
             f"on `{top.signal}` ({over})."]
    floor = auc[(auc["model"] == "nokd") & (auc["signal"] == top.signal)]
    if not floor.empty:
        lines.append(f"- The no-leakage floor, `nokd` (the student trained on public data "
                     f"alone), reaches {_pm(floor['mean'].iloc[0], floor['sd'].iloc[0])} on "
                     f"the same signal; the teacher "
                     + ", ".join(f"{_pm(r.mean, r.sd)}" for r in auc[
                         (auc["model"] == "teacher") & (auc["signal"] == top.signal)]
                         .itertuples()) + ".")
    kd_rows = auc[auc["model"].isin(_students(t["models"], tests))] if not auc.empty else auc
    if not kd_rows.empty and kd_rows.loc[kd_rows["mean"].idxmax(), "model"] != top.model:
        k = kd_rows.loc[kd_rows["mean"].idxmax()]
        lines.append(f"- Among the students distilled without DP, **{k.model}** leaks most: "
                     f"AUC {_pm(k['mean'], k.sd)} on `{k.signal}`.")
    if not tests.empty:
        row = tests[(tests["model"] == top.model) & (tests["signal"] == top.signal)]
        if not row.empty:
            r = row.iloc[0]
            lines.insert(2, f"- {top.model} against `nokd` on `{top.signal}`: ΔAUC "
                            f"{r.delta:+.3f} (95% CI [{r.ci_low:+.3f}, {r.ci_high:+.3f}], "
                            f"paired bootstrap over seeds and records): {r.verdict}.")
        kd = _students(t["models"], tests)
        leaking = [m for m in kd if (tests[(tests["model"] == m)]["verdict"]
                                     == "leaks more than nokd").any()]
        on_loss = [m for m in kd if ((tests["model"] == m) & (tests["signal"] == "loss")
                                     & (tests["verdict"] == "leaks more than nokd")).any()]
        lines.append(f"- The paper's pattern, every KD student leaking more than `nokd`: "
                     f"{len(on_loss)} of {len(kd)} KD methods leak significantly more on the "
                     f"`loss` signal ({', '.join(f'`{m}`' for m in on_loss) or 'none'}), "
                     f"{len(leaking)} of {len(kd)} on at least one signal.")
        if leaking:
            lines.append("- What to do: treat these students as carrying the teacher's private "
                         "data; do not release them as if trained on public data alone. Distil "
                         "from a DP teacher or train a DP student (see the privacy–utility "
                         "frontier below) and audit again.")
    return lines


def _pivot(frame: pd.DataFrame, index: str, fmt: Callable[[pd.Series], str],
           order: list[str], columns: list[str]) -> Table:
    rows = []
    for key in order:
        cells = [key]
        for col in columns:
            hit = frame[(frame[index] == key) & (frame["signal"] == col)]
            cells.append(fmt(hit.iloc[0]) if len(hit) else "—")
        rows.append(cells)
    return Table([index, *columns], rows)


def _metric_table(metrics: pd.DataFrame, metric: str, order: list[str], pct: bool) -> Table:
    rows = metrics[metrics["metric"] == metric]
    signals = signal_order(rows["signal"])
    scale, digits = (100.0, 1) if pct else (1.0, 3)

    def cell(r: pd.Series) -> str:
        if math.isnan(r["mean"]):
            return "n/a"
        if r["seeds"] == 1:
            return f"{scale * r['mean']:.{digits}f}"
        return (f"{_pm(scale * r['mean'], scale * r['sd'], digits)} "
                f"[{scale * r['low']:.{digits}f}, {scale * r['high']:.{digits}f}]")

    return _pivot(rows, "model", cell, [m for m in order if m in set(rows["model"])], signals)


def _tests_table(tests: pd.DataFrame) -> Table:
    rows = []
    for r in tests.itertuples():
        p = f"< {1 / r.n_bootstrap:.3f}" if r.p == 0 else f"{r.p:.3f}"
        rows.append([r.model, r.signal, f"{r.delta:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]",
                     p, str(r.verdict)])
    return Table(["model", "signal", "ΔAUC vs nokd (95% CI)", "p", "verdict"], rows)


def _frontier_table(points: pd.DataFrame) -> Table:
    rows = []
    for p in points.itertuples():
        rows.append([p.model, p.method, eps_label(p.epsilon) if p.private else "not DP",
                     f"{p.perplexity:.2f}", str(p.signal or "—"),
                     f"{p.auc:.3f} [{p.ci_low:.3f}, {p.ci_high:.3f}]" if not math.isnan(p.auc)
                     else "n/a",
                     "—" if math.isnan(p.epsilon_accounted) else f"{p.epsilon_accounted:.3g}"])
    return Table(["model", "method", "ε (per person)", "perplexity (non-members)",
                  "strongest signal", f"AUC (mean, {SPREAD})", "ε accounted"], rows)


# -- figures -------------------------------------------------------------------------------------
def _figures(t: Mapping[str, pd.DataFrame], order: list[str], out: Path
             ) -> dict[str, Any]:
    """Every figure (path or None), keyed by section."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):      # a model dropped since the last render leaves no figure
        old.unlink()
    mia = _as_mia(t["metrics"])
    seeds = int(t["metrics"]["seeds"].max()) if not t["metrics"].empty else 0
    figs: dict[str, Any] = {"heatmaps": [], "roc": [], "blocks": None, "memorization": None,
                            "frontier": None}
    heat_order = heatmap_order(t["models"] if not t["models"].empty else None, order)
    for metric, title in (("auc", "AUC"), ("tpr_at_1pct", "TPR at 1% FPR")):
        rows = t["metrics"][t["metrics"]["metric"] == metric] if not mia.empty else mia
        if rows.empty:
            continue
        png = plots.leakage_heatmap(
            rows.assign(value=rows["mean"]), metric, heat_order, signal_order(rows["signal"]),
            out / f"heatmap_{metric}.png", spread=rows.assign(value=rows["sd"]),
            title=f"{title}, " + ("one seed" if seeds == 1 else f"mean ± sd over {seeds} seeds"))
        if png is not None:
            figs["heatmaps"].append((title, png))
    roc, colors = t["roc"], plots.signal_colors(signal_order(mia["signal"]))
    aucs = {(r.model, r.signal): r.value for r in mia[mia["metric"] == "auc"].itertuples()}
    for model in [m for m in order if not roc.empty and m in set(roc["model"])]:
        curves = {s: (g["fpr"].to_numpy(float), g["tpr"].to_numpy(float))
                  for s, g in roc[roc["model"] == model].groupby("signal", sort=False)}
        n = mia.loc[mia["model"] == model, "n_nonmembers"].max() if "n_nonmembers" in mia \
            else math.nan
        figs["roc"].append((model, plots.roc_plot(
            curves, out / f"roc_{model.replace('@', '_at_')}.png",
            title=f"ROC, {model} (log-log)"
            + ("" if seeds == 1 else f", mean TPR over {seeds} seeds"),
            min_fpr=plots.min_fpr_for(n), colors=colors,
            aucs={s: aucs.get((model, s), math.nan) for s in curves})))
    if not t["blocks"].empty:
        b = t["blocks"].assign(auc=t["blocks"]["mean"], ci_low=t["blocks"]["low"],
                               ci_high=t["blocks"]["high"])
        figs["blocks"] = plots.block_risk_plot(b, order, out / "block_risk.png", band=SPREAD)
    memo = _mean_as_value(t["memorization"])
    if not memo.empty:
        auc = mia[(mia["metric"] == "auc") & (mia["model"] != "data")]
        best = auc.groupby("model")["value"].max()
        gap = memo[(memo["metric"] == "match_rate") & (memo["split"] == "gap")] \
            .set_index("model")["value"]
        points = [(m, float(best[m]), float(gap[m])) for m in order if m in best and m in gap]
        figs["memorization"] = plots.memorization_vs_auc_plot(points,
                                                              out / "memorization_vs_auc.png")
    points = frontier_points(mia, _mean_as_value(t["utility"]), _mean_as_value(t["privacy"]),
                             t["models"] if not t["models"].empty else None)
    if has_dp(points):
        figs["frontier"] = (points, plots.privacy_utility_plot(
            points, out / "privacy_utility.png", interval=SPREAD))
    return figs


# -- the document --------------------------------------------------------------------------------
def document(meta: Mapping[str, Any], t: Mapping[str, pd.DataFrame], figs: Mapping[str, Any],
             order: list[str], link: Callable[[Path], str]) -> str:
    """The report as Markdown; `link` turns a figure's path into its URL."""
    seeds = meta["seeds"]
    md = [f"# Benchmark `{meta['suite']}` ({meta['variant']}): {seeds_phrase(len(seeds))} "
          f"{seeds}", "", md_cell(meta.get("description", "")), ""]
    planned = meta.get("suite_seeds", seeds)
    if sorted(planned) != sorted(seeds):
        md += [f"The suite runs seeds {planned}; this report holds "
               f"{seeds_phrase(len(seeds))} {seeds}, the ones finished when it was made"
               + (": its intervals and tests are over records only." if len(seeds) == 1
                  else "."), ""]
    md += ["Every number below is measured on the runs this folder's tables come from; the "
           "machine and package versions are at the end. Rebuild with `make reports`.", "",
           "## Executive summary", "", *executive_summary(t), ""]

    def figure(title: str, path: Path | None) -> None:
        if path is not None:
            md.extend([f"![{title}]({link(path)})", ""])

    md += ["## Leakage heatmaps (mean ± sd over seeds)", ""]
    for title, png in figs["heatmaps"]:
        figure(f"{title} heatmap", png)
    metrics = t["metrics"]
    for metric, title, pct in (("auc", "ROC AUC", False), ("tpr_at_1pct", "TPR at 1% FPR (%)",
                                                            True)):
        if not metrics.empty and (metrics["metric"] == metric).any():
            md += [f"## {title} across seeds: mean ± sd [min, max]", "",
                   _metric_table(metrics, metric, order, pct).to_markdown(), ""]
    tests = t["paired_tests"]
    if not tests.empty:
        md += ["## Each model against nokd: paired test over seeds and records", "",
               "ΔAUC = AUC(model) − AUC(nokd) averaged over seeds; the interval is a paired "
               "hierarchical bootstrap (seeds, then members and non-members within a seed, the "
               f"same records for both models, {int(tests['n_bootstrap'].iloc[0])} draws). A "
               "verdict other than \"no significant difference\" needs the whole interval on "
               "one side of zero.", "", _tests_table(tests).to_markdown(), ""]
    blind = metrics[(metrics["model"] == "data") & (metrics["metric"] == "auc")] \
        if not metrics.empty else metrics
    md += ["## Blind-baseline check", ""]
    if blind.empty:
        md += ["No model-free signal was run, so the split itself was not checked.", ""]
    for r in blind.itertuples():
        state = ("a distribution shift between members and non-members: model AUCs above "
                 "are inflated by it" if r.mean > 0.6 else
                 "no shift a model-free attack can see (a sound split)")
        md += [f"- `{r.signal}` on the data alone: AUC {_pm(r.mean, r.sd)} [{r.low:.3f}, "
               f"{r.high:.3f}]: {state}.", ""]
    if figs["roc"]:
        md += ["## ROC per model (log-log)", "",
               "Each curve is the mean TPR over the seeds at each FPR (vertical averaging); the "
               "legend gives the mean AUC.", ""]
        for model, png in figs["roc"]:
            figure(f"ROC {model}", png)
    md += ["## Per-block risk", ""]
    if figs["blocks"] is None:
        md += ["Not measured in this suite (per-block MoPe needs n_blocks × perturbations "
               "passes per model; the `tiny-full` suite runs it).", ""]
    figure("Per-block risk", figs["blocks"])
    memo = _mean_as_value(t["memorization"])
    if not memo.empty:
        md += ["## Memorization against membership (mean over seeds)", ""]
        figure("Memorization against membership", figs["memorization"])
        table = memorization_table(memo, order)
        if table is not None:
            md += [table.to_markdown(), ""]
    cats = t["auc_by_category"]
    if not cats.empty:
        pivot = cats.pivot(index="category", columns="model", values="auc")
        cols = [m for m in order if m in pivot.columns]
        md += ["## Loss-signal AUC per task category (mean over seeds)", "",
               Table(["category", *cols],
                     [[str(c), *("—" if pd.isna(row[m]) else f"{row[m]:.3f}" for m in cols)]
                      for c, row in pivot.iterrows()]).to_markdown(), ""]
    ratios = t["teacher_to_student"]
    if not ratios.empty:
        md += ["## Teacher → student: share of the teacher's AUC above ½ that the student kept",
               "", "(AUC − ½) / (teacher AUC − ½) of the mean AUCs, where the teacher reaches "
               "0.55 or more.", "",
               _pivot(ratios, "model", lambda r: f"{r['ratio']:.2f}",
                      [m for m in order if m in set(ratios["model"])],
                      signal_order(ratios["signal"])).to_markdown(), ""]
    utility = utility_table(_mean_as_value(t["utility"]), order) \
        if not t["utility"].empty else None
    if utility is not None:
        md += ["## Utility (mean over seeds)", "", utility.to_markdown(), ""]
    md += ["## Privacy–utility frontier", ""]
    if figs["frontier"] is None:
        md += ["No DP model in this suite.", ""]
    else:
        points, png = figs["frontier"]
        md += [f"Error bars: {SPREAD}. ε is per person (every record of a person together) "
               "where the run's unit is the person.", ""]
        figure("Privacy–utility frontier", png)
        md += [_frontier_table(points).to_markdown(), ""]
    runs = t["runs"]
    if not runs.empty:
        md += ["## Runs", "", Table(
            ["run", "seed", "stage time", "wall time of the finishing invocation",
             "peak resident memory"],
            [[str(r.run), str(r.seed), _minutes(r.stage_seconds), _minutes(r.wall_seconds),
              "n/a" if math.isnan(r.peak_rss_mib) else f"{r.peak_rss_mib / 1024:.2f} GiB"]
             for r in runs.itertuples()]).to_markdown(), ""]
    md += ["## Configuration (seed 0)", "", fence(config_text(meta.get("config", {})), "toml"),
           "", "## Machine and package versions", "",
           Table(["package", "version"], [[k, str(v)] for k, v in
                                          meta.get("versions", {}).items()]).to_markdown(), "",
           "No record text appears in this report, so there is nothing to redact; each run's "
           "own report redacts declared secrets.", ""]
    return "\n".join(md)


def _minutes(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds / 60:.1f} min"


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font:15px/1.5 system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem}}
table{{border-collapse:collapse;margin:.5rem 0 1rem}}td,th{{border:1px solid #ccc;
padding:.2rem .5rem;font-size:13px}}th{{background:#f3f3f3}}img{{max-width:100%}}
pre{{background:#f6f6f6;padding:.6rem;overflow-x:auto}}</style></head>
<body>
{body}</body></html>
"""


def write_benchmark_report(folder: str | Path) -> dict[str, Path]:
    """Render `folder`'s tables into report.md, report.html and figures/ (and figures.json:
    each figure's SHA-256 and the matplotlib that drew it); return their paths."""
    import hashlib

    import matplotlib
    from markdown_it import MarkdownIt

    folder = Path(folder)
    meta, t = load(folder)
    order = model_order(t["models"] if not t["models"].empty else None,
                        _as_mia(t["metrics"]))
    figs = _figures(t, order, folder / "figures")
    md = document(meta, t, figs, order, lambda p: f"figures/{p.name}")
    html_md = document(meta, t, figs, order, _data_uri)
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(html_md)
    title = f"kdaudit benchmark {meta['suite']} ({meta['variant']})"
    paths = {"md": folder / "report.md", "html": folder / "report.html"}
    atomic_write_text(paths["md"], md)
    atomic_write_text(paths["html"], HTML_PAGE.format(title=md_cell(title), body=body))
    pngs = sorted((folder / "figures").glob("*.png"))
    atomic_write_json(folder / FIGURES_INDEX, {
        "matplotlib": matplotlib.__version__,
        "figures": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in pngs}})
    return paths
