"""Assemble the report: tables, verdicts and figures → report.html (self-contained) and
report.md (with the PNG files beside it)."""
from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
from markupsafe import Markup
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from attacks.blind import CONFOUND_AUC as BLIND_CONFOUND_AUC
from kdaudit.store import atomic_write_text
from kdaudit.report.contents import ReportTables

from kdaudit.report import plots
from kdaudit.report.frontier import (accounting_violations, frontier_points, frontier_table,
                                     has_dp, lmo_claim_warning, violation_warning)
from kdaudit.report.redact import REDACTED, Redactor, example_records, parse_secrets
from kdaudit.report.tables import (CELL_CHARS, Table, clip, heatmap_grid, heatmap_order, md_cell, memorization_table,
                                   model_order, num, ordered, results_table, signal_order,
                                   utility_table)
from kdaudit.report.verdicts import MODEL_FREE_SIGNALS, signal_checks, verdicts

TEMPLATES = Path(__file__).with_name("templates")


def md_text(value: Any) -> Any:
    """Every value a Markdown template prints, unless a filter already made it safe (fenced
    code, tables of escaped cells: `Markup`): no raw HTML survives wherever Markdown is
    shown as HTML, since every `<` (which opens any tag) becomes an entity."""
    if isinstance(value, Markup) or not isinstance(value, str):
        return value
    return value.replace("<", "&lt;")


def environment(autoescape: bool) -> jinja2.Environment:
    """HTML: jinja's autoescape. Markdown: `md_text` on every printed value, and the
    filters md_table, md_cell (one table cell or heading line) and fence (a code block)."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=autoescape,
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True,
                             finalize=None if autoescape else md_text)
    env.filters["md_table"] = lambda t: Markup(t.to_markdown())
    env.filters["md_cell"] = lambda s: Markup(md_cell(s))
    env.filters["fence"] = lambda text, lang="text": Markup(fence(text, lang))
    env.filters["code"] = code_span
    return env


def code_span(text: object) -> Markup:
    """Inline code that no backtick inside `text` can close (entities would show literally
    there, so the text goes in as it is)."""
    s = " ".join(str(text).split())
    ticks = "`" * (max((len(m) for m in re.findall(r"`+", s)), default=0) + 1)
    pad = " " if s.startswith("`") or s.endswith("`") else ""
    return Markup(f"{ticks}{pad}{s}{pad}{ticks}")


def fence(text: str, lang: str = "text") -> str:
    """A Markdown fenced code block that no backtick run inside `text` can close."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{lang}\n{text}\n{ticks}"


def config_text(config: Any) -> str:
    """A nested mapping (or dataclass) as TOML-like text: scalars first, then [tables]."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        return _toml_value(config)
    lines: list[str] = []

    def emit(table: Mapping[str, Any], prefix: list[str]) -> None:
        scalars = [(k, v) for k, v in table.items() if not isinstance(v, Mapping)]
        tables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
        if prefix and (scalars or not tables):
            lines.extend(["", "[" + ".".join(_toml_key(p) for p in prefix) + "]"])
        for key, value in scalars:
            lines.append(f"# {_toml_key(key)} = (unset)" if value is None
                         else f"{_toml_key(key)} = {_toml_value(value)}")
        for key, value in tables:
            emit(value, [*prefix, str(key)])

    emit(config, [])
    return "\n".join(lines).strip("\n")


def _toml_key(key: object) -> str:
    k = str(key)
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k, ensure_ascii=False)


def _toml_value(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return repr(f)
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, (list, tuple, set, np.ndarray)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if v is None:
        return '"none"'
    return json.dumps(str(v), ensure_ascii=False)


def shareable(value: Any) -> Any:
    """`value` with every absolute local path cut to its last part ("…/teacher"): a report
    is for sharing and should not reveal the layout of the machine it was made on."""
    if isinstance(value, str) and os.path.isabs(value) and len(value) > 1:
        return f"…/{Path(value).name}"
    if isinstance(value, Mapping):
        return {k: shareable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [shareable(v) for v in value]
    return value


def run_info_rows(run_info: Mapping[str, Any] | None, prefix: str = "") -> list[tuple[str, str]]:
    """Nested run info flattened to (dotted key, display value) pairs."""
    rows: list[tuple[str, str]] = []
    for key, value in (run_info or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += run_info_rows(value, f"{name}.")
        elif isinstance(value, (float, np.floating)):
            rows.append((name, f"{float(value):.4g}"))
        elif isinstance(value, (list, tuple)):
            rows.append((name, ", ".join(str(x) for x in value)))
        else:
            rows.append((name, str(value)))
    return rows


def pick_baseline(models: pd.DataFrame | None, mia: pd.DataFrame) -> str:
    """`nokd` when audited; else the first model whose role is "baseline"; else `nokd`."""
    audited = set(mia["model"].astype(str))
    if "nokd" in audited or models is None or models.empty or "role" not in models:
        return "nokd"
    roles = models[(models["role"] == "baseline") & models["model"].isin(audited)]
    return str(roles["model"].iloc[0]) if len(roles) else "nokd"


def unique_slug(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"
    slug, i = base, 2
    while slug in taken:
        slug, i = f"{base}_{i}", i + 1
    taken.add(slug)
    return slug


def _split_check(mia: pd.DataFrame) -> str:
    """One sentence on the blind baseline, shown at the top whenever it ran."""
    auc = mia[(mia["metric"] == "auc") & mia["signal"].isin(MODEL_FREE_SIGNALS)]
    if auc.empty:
        return ""
    r = auc.iloc[0]
    return (f" Split check: a model-free classifier ({r['signal']} baseline) tells members from "
            f"non-members with AUC {float(r['value']):.3f} [{float(r['ci_low']):.3f}, "
            f"{float(r['ci_high']):.3f}]; about 0.5 means no distribution shift could fake a "
            f"membership signal, above {BLIND_CONFOUND_AUC} flags the split.")


def _summary(order: Sequence[str], verdict_df: pd.DataFrame, baseline: str,
             memorization: pd.DataFrame | None) -> str:
    """The report's opening paragraph: which models show elevated risk."""
    elevated = [m for m in verdict_df.loc[verdict_df["verdict"] == "elevated", "model"]]
    clear = [m for m in verdict_df.loc[verdict_df["verdict"] != "elevated", "model"]]
    audited = [m for m in order if m in set(verdict_df["model"])]
    if not audited:
        return "No membership-inference results were provided, so no verdict can be given."
    text = (f"This report audits {len(audited)} model{'s' if len(audited) != 1 else ''} "
            f"({', '.join(audited)}) for leakage of their private training records through "
            "membership inference and memorization. ")
    if elevated:
        text += (f"Elevated membership-inference risk at 95% confidence: {', '.join(elevated)}"
                 f" (compared with the {baseline} baseline, or with chance for the baseline "
                 "itself). ")
        if clear:
            text += f"No elevated risk detected: {', '.join(clear)}. "
    else:
        text += "No model shows membership-inference risk above the baseline at 95% confidence. "
    if memorization is not None and not memorization.empty:
        gaps = memorization[(memorization["metric"] == "match_rate")
                            & (memorization["split"] == "gap")]
        gaps = gaps.assign(v=pd.to_numeric(gaps["value"], errors="coerce")).dropna(subset=["v"])
        if len(gaps):
            top = gaps.loc[gaps["v"].idxmax()]
            text += (f"The largest member/non-member gap in greedy match rate is "
                     f"{top['v']:+.3f} ({top['model']}).")
    return text.strip()


def _blind_warning(mia: pd.DataFrame) -> str | None:
    auc = mia[(mia["metric"] == "auc") & mia["signal"].isin(MODEL_FREE_SIGNALS)]
    values = pd.to_numeric(auc["value"], errors="coerce").dropna()
    if values.empty or values.max() <= BLIND_CONFOUND_AUC:
        return None
    return (f"Warning: the model-free blind baseline separates members from non-members with "
            f"AUC {values.max():.2f} > {BLIND_CONFOUND_AUC}; the split may be confounded by "
            "distribution shift, so membership results in this report may be inflated.")


def _signals_table(signals: pd.DataFrame | None) -> Table | None:
    """Signal, the access it assumes, what it computes, and where (and why) it did not run."""
    if signals is None or signals.empty:
        return None
    rows = [[str(r.signal), str(r.access), str(r.description),
             str(r.not_run_for) if isinstance(r.not_run_for, str) and r.not_run_for
             else "ran for every model"] for r in signals.itertuples()]
    return Table(columns=["Signal", "Access assumed", "What it computes", "Not run for (why)"],
                 rows=rows)


def _memo_points(mia: pd.DataFrame, memorization: pd.DataFrame | None,
                 order: Sequence[str]) -> list[tuple[str, float, float]]:
    if memorization is None or memorization.empty or mia.empty:
        return []
    auc = mia[mia["metric"] == "auc"].groupby("model")["value"].max()
    gap = memorization[(memorization["metric"] == "match_rate") &
                       (memorization["split"] == "gap")].set_index("model")["value"]
    return [(m, float(auc[m]), float(gap[m])) for m in order if m in auc and m in gap]


def _riskiest_tables(riskiest: pd.DataFrame | None, order: Sequence[str],
                     redactor: Redactor | None) -> dict[str, Table] | None:
    """Per model, its ten most member-like records by its strongest signal, their texts
    through `redactor` where there is one."""
    if riskiest is None or riskiest.empty:
        return None
    out = {}
    for model in [m for m in order if m in set(riskiest["model"])]:
        rows = []
        for r in riskiest[riskiest["model"] == model].itertuples():
            texts = [str(r.record_id), str(r.instruction), str(r.response)]
            if redactor is not None:
                texts = [redactor(t) for t in texts]
            record_id, instruction, response = texts
            rows.append([str(r.rank), clip(record_id, 80), "member" if r.member else "non-member",
                         f"{r.score:.4g}", str(r.category), clip(instruction, CELL_CHARS),
                         clip(response, CELL_CHARS)])
        signal = riskiest[riskiest["model"] == model]["signal"].iloc[0]
        out[f"{model} (by {signal})"] = Table(
            columns=["#", "Record", "Truly", "Score", "Category", "Instruction", "Response"],
            rows=rows)
    return out


PRIVACY_LABELS = {
    "epsilon_accounted": "ε accounted (DP-SGD accountant, upper bound)",
    "epsilon_claimed_lmo": "ε claimed by LMO-DP (its own accounting, not a guarantee)",
    "epsilon_lower_bound_lmo_pld": "ε lower bound of the LMO-DP noise (PLD)",
    "exposure_mean": "canary exposure, mean (bits)",
    "exposure_max": "canary exposure, max (bits)",
    "epsilon_lower_bound_one_run": "ε lower bound, one run, canary records (rigorous, 95%)",
    "epsilon_lower_bound_white_box": "ε lower bound, one run, gradient canaries (white box, "
                                     "rigorous, 95%)",
    "epsilon_person_record_level": "ε of the largest person under record-level DP",
    "epsilon_estimate_heuristic": "ε estimate (heuristic, not a bound)",
}


def _privacy_table(privacy: pd.DataFrame | None, order: Sequence[str]) -> Table | None:
    """Empirical privacy per model, each number labelled with what kind of number it is."""
    if privacy is None or privacy.empty:
        return None
    rank = {m: i for i, m in enumerate(order)}
    rows = sorted(privacy.itertuples(), key=lambda r: (rank.get(r.model, len(rank)),
                                                        list(PRIVACY_LABELS).index(r.metric)
                                                        if r.metric in PRIVACY_LABELS else 99))
    return Table(columns=["Model", "Measure", "Value", "How it was obtained"],
                 rows=[[str(r.model), PRIVACY_LABELS.get(r.metric, str(r.metric)),
                        f"{r.value:.2f}", str(r.note)] for r in rows])


def _frontier(mia: pd.DataFrame, utility: pd.DataFrame | None,
              privacy: pd.DataFrame | None, models: pd.DataFrame | None, order: Sequence[str],
              out: Path, paths: dict[str, Path]) -> dict[str, Any] | None:
    """The privacy–utility frontier figure and table; None without a DP model."""
    points = frontier_points(mia, utility, privacy, models)
    if not has_dp(points):
        return None
    png = plots.privacy_utility_plot(points, out / "privacy_utility.png")
    if png is not None:
        paths["privacy_utility"] = png
    checked = points["epsilon_accounted"].notna() & points["epsilon_lower_bound"].notna()
    return {"file": None if png is None else png.name,
            "uri": None if png is None else _data_uri(png),
            "table": frontier_table(points),
            "warning": violation_warning(accounting_violations(privacy, order)),
            "checked": bool(checked.any())}


HEATMAP_METRICS = (("auc", "AUC"), ("tpr_at_1pct", "TPR at 1% FPR"))


def heatmap_table(mia: pd.DataFrame, metric: str, order: Sequence[str],
                  signals: Sequence[str] | None = None) -> Table | None:
    """The numbers of one heatmap (rows models, columns signals, model-free ones left out),
    so report.md reads without its images; "—" where a value is missing or unreachable."""
    signals = signal_order(mia["signal"]) if signals is None else signals
    grid = heatmap_grid(mia, metric, order, signals)
    if grid.empty:
        return None
    body = [[str(m), *("—" if math.isnan(v) else f"{v:.3f}" for v in row)]
            for m, row in zip(grid.index, grid.to_numpy(dtype=float))]
    return Table(["Model", *map(str, grid.columns)], body)


def heatmap_figures(mia: pd.DataFrame, order: Sequence[str], out: Path, paths: dict[str, Path],
              prefix: str = "", title: str = "") -> tuple[list[dict[str, Any]], list[str]]:
    """AUC and TPR-at-1%-FPR heatmaps (model × signal) with the tables behind them, and a
    note for each metric that was computed but has no value to draw (a TPR at 1% FPR needs
    at least 100 non-members). `order` is the row order (see `heatmap_order`); columns are
    the signals in registry order."""
    signals = signal_order(mia["signal"])
    found, notes = [], []
    for metric, label in HEATMAP_METRICS:
        name = f"{prefix}heatmap_{metric}"
        png = plots.leakage_heatmap(mia, metric, order, signals, out / f"{name}.png",
                                    title=f"{title}{label}")
        if png is None:
            if (mia["metric"] == metric).any():
                notes.append(f"No {label} heatmap: no model has a value for it (see the notes "
                             f"of the membership-inference results).")
            continue
        paths[name] = png
        found.append({"label": label, "file": png.name, "uri": _data_uri(png),
                      "table": heatmap_table(mia, metric, order, signals)})
    return found, notes


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _declared(frame: pd.DataFrame | None) -> list[str]:
    if frame is None or frame.empty or "secrets" not in frame:
        return []
    return [s for v in frame["secrets"] for s in parse_secrets(v)]


SHOW_SECRETS_HINT = "AuditResult.write_report(out_dir, redact=False)"
REDACTION_METHOD = ("each record's declared `secrets` and, in every shown text, e-mail "
                    "addresses, phone numbers, full dates, US street addresses and runs of six "
                    "or more digits (pattern detectors) are replaced by the marker; names and "
                    "other free text are caught only when a record declares them as `secrets`")


def write_report(out_dir: str | os.PathLike[str], tables: ReportTables, *,
                 title: str = "kdaudit risk report", run_info: Mapping[str, Any] | None = None,
                 redact: bool = True, show_secrets_hint: str | None = None) -> dict[str, Path]:
    """Write out_dir/report.html, out_dir/report.md and the PNG figures; return their paths
    (keys "html", "md", "auc_bars", "roc_<model>" and, with DP models, "privacy_utility").

    `tables` is a `ReportTables` (an `AuditResult` is one); `show_secrets_hint` is how a
    reader of a redacted report gets the clear one.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = tables
    order = model_order(t.models, t.mia, t.memorization, t.utility, t.examples)
    paths: dict[str, Path] = {}
    context = {"title": title, **_figures(t, order, out, paths),
               **_text(t, order, redact, show_secrets_hint), "redact": redact,
               "redacted_marker": REDACTED, "input_notes": list(t.notes),
               "config": None if not t.config else config_text(shareable(t.config)),
               "run_info": run_info_rows(shareable(run_info))}
    html = environment(autoescape=True).get_template("report.html.j2").render(**context)
    md = environment(autoescape=False).get_template("report.md.j2").render(**context)
    for key, text in (("html", html), ("md", md)):
        paths[key] = out / f"report.{key}"
        atomic_write_text(paths[key], text)
    return paths


def _figure(path: Path | None) -> dict[str, str] | None:
    return None if path is None else {"file": path.name, "uri": _data_uri(path)}


def _roc_figures(t: ReportTables, order: Sequence[str], out: Path, paths: dict[str, Path],
                 colors: Mapping[str, Any]) -> list[dict[str, str]]:
    """One log-log ROC plot per model, in report order."""
    mia = t.mia
    aucs = {(str(r.model), str(r.signal)): num(r.value)
            for r in mia[mia["metric"] == "auc"].itertuples()}
    figures, taken = [], set()
    for model in tqdm([*order, *(m for m in t.roc if m not in order)], desc="report figures",
                      unit="model", mininterval=1.0):
        curves = t.roc.get(model)
        if not curves:
            continue
        n = pd.to_numeric(mia.loc[mia["model"] == model, "n_nonmembers"], errors="coerce").max()
        path = plots.roc_plot(curves, out / f"roc_{unique_slug(model, taken)}.png",
                              title=f"ROC, {model} (log-log)", min_fpr=plots.min_fpr_for(n),
                              aucs={s: aucs.get((model, s), math.nan) for s in curves},
                              colors=colors)
        paths[f"roc_{model}"] = path
        figures.append({"model": model, "file": path.name, "uri": _data_uri(path)})
    return figures


def _figures(t: ReportTables, order: Sequence[str], out: Path,
             paths: dict[str, Path]) -> dict[str, Any]:
    """Every figure of the report (written to `out`, recorded in `paths`) as template
    context."""
    colors = plots.signal_colors(ordered(t.mia["signal"]))
    figures = {"roc_figures": _roc_figures(t, order, out, paths, colors)}
    named = {
        "bars": ("auc_bars", lambda: plots.auc_bar_chart(t.mia, order, out / "auc_bars.png",
                                                         colors=colors)),
        "blocks": ("block_risk", lambda: plots.block_risk_plot(t.blocks, order,
                                                               out / "block_risk.png")),
        "curves": ("training_curves", lambda: plots.training_curves(
            t.training, order, out / "training_curves.png")),
        "scatter": ("memorization_vs_auc", lambda: plots.memorization_vs_auc_plot(
            _memo_points(t.mia, t.memorization, order), out / "memorization_vs_auc.png")),
    }
    for key, (name, draw) in named.items():
        path = draw()
        if path is not None:
            paths[name] = path
        figures[key] = _figure(path)
    figures["heatmaps"], figures["heatmap_notes"] = heatmap_figures(
        t.mia, heatmap_order(t.models, order), out, paths)
    figures["frontier"] = _frontier(t.mia, t.utility, t.privacy, t.models, order, out, paths)
    return figures


def _text(t: ReportTables, order: Sequence[str], redact: bool,
          show_secrets_hint: str | None) -> dict[str, Any]:
    """The report's verdicts, tables and (redacted) example texts as template context."""
    mia = t.mia
    baseline = pick_baseline(t.models, mia)
    verdict_df = verdicts(mia, baseline)
    # one redactor for every shown text, from every secret the caller and the tables declare
    redactor = Redactor([*t.secrets, *_declared(t.riskiest), *_declared(t.examples)]) \
        if redact else None
    roles = {} if t.models is None or t.models.empty else {
        str(r.model): (str(getattr(r, "role", "")), str(getattr(r, "description", "")))
        for r in t.models.itertuples()}
    return {
        "summary": _summary(order, verdict_df, baseline, t.memorization)
        + _split_check(mia),
        "warning": _blind_warning(mia),
        "accounting_warning": " ".join(w for w in (
            violation_warning(accounting_violations(t.privacy, order)),
            lmo_claim_warning(t.privacy)) if w) or None,
        "baseline": baseline,
        "verdicts": [{"model": v.model, "verdict": v.verdict, "text": v.text,
                      "role": roles.get(v.model, ("", ""))[0],
                      "description": roles.get(v.model, ("", ""))[1]}
                     for v in verdict_df.itertuples()],
        "results": results_table(mia, signal_checks(mia, baseline), order),
        "memorization": memorization_table(t.memorization, order),
        "utility": utility_table(t.utility, order),
        "signals": _signals_table(t.signals),
        "privacy": _privacy_table(t.privacy, order),
        "riskiest": _riskiest_tables(t.riskiest, order, redactor),
        "examples": example_records(t.examples, order, redactor=redactor),
        # after every redacted text above: the summary counts what was redacted
        "redaction": {"summary": redactor.summary() if redactor else "", "how": REDACTION_METHOD,
                      "hint": show_secrets_hint or SHOW_SECRETS_HINT},
    }
