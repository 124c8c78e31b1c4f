"""The report's figures: log-log ROC curves per model, an AUC bar chart, per-block risk,
memorization against membership, model × signal leakage heatmaps, training curves and the
privacy–utility frontier of DP distillation.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot, no GUI and
no global figure registry), so this works headless and never changes the backend of an
interactive session that imports kdaudit. Each figure is released once it is saved.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from kdaudit.report.frontier import eps_label
from kdaudit.report.tables import heatmap_grid

DEFAULT_MIN_FPR = 1e-3
DPI = 110


def signal_colors(signals: Sequence[str]) -> dict[str, str]:
    """One fixed colour per signal, shared by every figure of a report."""
    palette = [f"C{i}" for i in range(10)]
    return {s: palette[i % len(palette)] for i, s in enumerate(signals)}


def _new_figure(width: float, height: float) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _margins(fig: Figure, *, left: float = 0.8, right: float = 0.2, bottom: float = 0.6,
             top: float = 0.4) -> None:
    """Fixed margins in inches (cheaper than a tight bounding box, which redraws)."""
    w, h = fig.get_size_inches()
    fig.subplots_adjust(left=left / w, right=1 - right / w, bottom=bottom / h, top=1 - top / h)


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    fig.clear()  # release the artists; the Figure is not registered anywhere else
    return path


def min_fpr_for(n_nonmembers: float | None) -> float:
    """The lower axis limit: 1/n when the number of non-members is known, else 1e-3."""
    if n_nonmembers is None or not n_nonmembers > 0 or math.isnan(n_nonmembers):
        return DEFAULT_MIN_FPR
    return 1.0 / n_nonmembers


def roc_plot(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: Path, *,
             title: str, aucs: Mapping[str, float] | None = None,
             min_fpr: float = DEFAULT_MIN_FPR,
             colors: Mapping[str, str] | None = None) -> Path:
    """One model's ROC curves (one per signal) on log-log axes, with the chance diagonal."""
    fig, ax = _new_figure(5.4, 4.6)
    ax.set_xscale("log", nonpositive="mask")
    ax.set_yscale("log", nonpositive="mask")
    for signal, (fpr, tpr) in curves.items():
        fpr, tpr = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
        keep = (fpr > 0) & (tpr > 0)
        auc = (aucs or {}).get(signal, math.nan)
        label = signal if math.isnan(auc) else f"{signal} (AUC {auc:.2f})"
        ax.plot(fpr[keep], tpr[keep], lw=1.6, label=label, color=(colors or {}).get(signal))
    ax.plot([min_fpr, 1], [min_fpr, 1], ls="--", lw=1, color="0.4", label="chance")
    for fpr_mark in (1e-2, 1e-3):
        if fpr_mark > min_fpr:
            ax.axvline(fpr_mark, ls=":", lw=0.8, color="0.6")
    ax.set_xlim(min_fpr, 1)
    ax.set_ylim(min_fpr, 1)
    ax.set_xlabel("False positive rate")
    ax.set_ylabel("True positive rate")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    _margins(fig)
    return _save(fig, path)


def auc_bar_chart(mia: pd.DataFrame, order: Sequence[str], path: Path, *,
                  colors: Mapping[str, str] | None = None) -> Path | None:
    """AUC per model (groups) and signal (bars) with 95% CI error bars and a 0.5 line."""
    auc = mia[mia["metric"] == "auc"].drop_duplicates(["model", "signal"])
    if auc.empty:
        return None
    models = [m for m in order if m in set(auc["model"])]
    signals = list(dict.fromkeys(auc["signal"]))
    table = auc.set_index(["model", "signal"])
    width = 0.8 / len(signals)
    legend_width = 1.6
    fig, ax = _new_figure(max(5.0, 1.0 + 0.35 * len(models) * len(signals)) + legend_width, 4.2)
    x = np.arange(len(models))
    lows = []
    for j, signal in enumerate(signals):
        vals, err_lo, err_hi = [], [], []
        for model in models:
            row = table.loc[(model, signal)] if (model, signal) in table.index else None
            v = math.nan if row is None else float(row["value"])
            lo = math.nan if row is None else float(row["ci_low"])
            hi = math.nan if row is None else float(row["ci_high"])
            vals.append(v)
            err_lo.append(0.0 if math.isnan(lo) else max(v - lo, 0.0))
            err_hi.append(0.0 if math.isnan(hi) else max(hi - v, 0.0))
            lows.append(lo if not math.isnan(lo) else v)
        ax.bar(x - 0.4 + width * (j + 0.5), vals, width, yerr=[err_lo, err_hi], capsize=2,
               label=signal, color=(colors or {}).get(signal), error_kw={"lw": 0.8})
    ax.axhline(0.5, ls="--", lw=1, color="0.3", label="chance (0.5)")
    finite = [v for v in lows if not math.isnan(v)]
    bottom = min([0.4, *(v - 0.05 for v in finite)])
    ax.set_ylim(max(0.0, bottom), 1.0)
    rotate = len(models) > 6
    ax.set_xticks(x, models, rotation=30 if rotate else 0, ha="right" if rotate else "center")
    ax.set_ylabel("ROC AUC (95% CI)")
    ax.set_title("Membership-inference AUC by model and signal")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _margins(fig, right=legend_width, bottom=1.1 if rotate else 0.5)
    return _save(fig, path)


def block_risk_plot(blocks: pd.DataFrame, order: Sequence[str], path: Path, *,
                    band: str = "95% CI") -> Path | None:
    """Per-block MoPe AUC against relative depth, one curve per model with the band between
    `ci_low` and `ci_high` (what that band is: `band`)."""
    if blocks is None or blocks.empty:
        return None
    fig, ax = _new_figure(6.0, 4.0)
    for model in [m for m in order if m in set(blocks["model"])]:
        b = blocks[blocks["model"] == model].sort_values("block")
        depth = b["block"].to_numpy() / b["n_blocks"].to_numpy()
        ax.plot(depth, b["auc"], marker="o", label=model)
        ax.fill_between(depth, b["ci_low"], b["ci_high"], alpha=0.15)
    ax.axhline(0.5, ls="--", lw=1, color="0.3", label="chance (0.5)")
    ax.set_xlabel("block depth (block / number of blocks)")
    ax.set_ylabel(f"AUC of block MoPe ({band})")
    ax.set_title("Per-block membership risk")
    ax.set_xlim(0, 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    _margins(fig)
    return _save(fig, path)


def memorization_vs_auc_plot(points: Sequence[tuple[str, float, float]],
                             path: Path) -> Path | None:
    """One point per model: member/non-member match-rate gap against its strongest AUC.
    Membership and memorization can disagree; this shows where."""
    if not points:
        return None
    fig, ax = _new_figure(5.5, 4.0)
    for model, auc, gap in points:
        ax.scatter(auc, gap, s=30)
        ax.annotate(model, (auc, gap), textcoords="offset points", xytext=(4, 4),
                    fontsize="small")
    ax.axvline(0.5, ls="--", lw=1, color="0.3")
    ax.axhline(0.0, ls=":", lw=1, color="0.3")
    ax.set_xlabel("strongest membership AUC")
    ax.set_ylabel("match-rate gap (members − non-members)")
    ax.set_title("Memorization against membership inference")
    ax.grid(True, alpha=0.3)
    _margins(fig)
    return _save(fig, path)


def leakage_heatmap(mia: pd.DataFrame, metric: str, order: Sequence[str],
                    signals: Sequence[str], path: Path, *, title: str,
                    spread: pd.DataFrame | None = None) -> Path | None:
    """Model × signal grid of `metric` ("auc" or "tpr_at_1pct"), every cell annotated: the
    paper's view of which distillation technique leaks through which attack.

    Rows follow `order`, columns `signals` (model-free signals and the "data" row left out);
    a missing or unreachable value is a blank cell marked "—". AUC uses a diverging map
    centred at chance (0.5), TPR a sequential one from 0. With `spread` (rows like `mia`,
    `value` the standard deviation across seeds) each cell reads "mean±sd". None when no cell
    has a number.
    """
    grid = heatmap_grid(mia, metric, order, signals)
    sd = None if spread is None else heatmap_grid(spread, metric, order, signals) \
        .reindex_like(grid).to_numpy(dtype=float)
    values = grid.to_numpy(dtype=float)
    if values.size == 0 or not np.isfinite(values).any():
        return None
    models, cols = list(grid.index), list(grid.columns)
    if metric == "auc":
        span = max(0.1, float(np.nanmax(np.abs(values - 0.5))))
        cmap, vmin, vmax = "RdBu_r", 0.5 - span, 0.5 + span
    else:
        cmap, vmin, vmax = "Reds", 0.0, max(0.05, float(np.nanmax(values)))
    # room on the left for the longest model name (≈ 0.075 inch a character at this size)
    left = max(1.2, 0.3 + 0.075 * max(len(str(m)) for m in models))
    # the margins below take 1.3 inches of height: one model still gets a row to draw in
    fig, ax = _new_figure(left + 0.85 * len(cols), max(0.9 + 0.38 * len(models), 1.7))
    image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    for i in range(len(models)):
        for j in range(len(cols)):
            v = values[i, j]
            # white text where the cell colour is dark (far from the map's light end/centre)
            if math.isnan(v):
                dark = False
            elif metric == "auc":
                dark = abs(v - 0.5) > 0.6 * span
            else:
                dark = (v - vmin) / (vmax - vmin) > 0.6
            text = "—" if math.isnan(v) else f"{v:.2f}"
            if sd is not None and not math.isnan(v) and not math.isnan(sd[i, j]):
                text += f"±{sd[i, j]:.2f}"
            ax.text(j, i, text, ha="center", va="center",
                    fontsize="small" if sd is None else "x-small",
                    color="white" if dark else "black")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(models)), models)
    ax.set_title(title, fontsize="medium")
    fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02).ax.tick_params(labelsize="x-small")
    _margins(fig, left=left, right=0.55, bottom=0.9)
    return _save(fig, path)


# Columns of a training log drawn as extra lines beside the loss, and the share of
# student-generated batches (DistiLLM's adaptive schedule) drawn as a step plot; the
# training loop logs it as `student_data_prob`, `off_policy_prob` is accepted too.
CURVE_LINES = (("objective", "objective"), ("val_loss", "validation loss"))
OFF_POLICY_COLUMNS = ("student_data_prob", "off_policy_prob")


def training_curves(training: pd.DataFrame | None, order: Sequence[str],
                    path: Path) -> Path | None:
    """Small multiples, one panel per trained model: the training loss against step, the
    method's own objective where it differs from the loss, the validation loss where one
    was logged, and the probability of a student-generated batch on a second axis.
    None when there is no log to draw."""
    if training is None or training.empty or not {"model", "step", "loss"} <= set(training):
        return None
    known = set(training["model"].astype(str))
    models = [m for m in order if m in known] + sorted(known - set(order))
    cols = min(4, len(models))
    nrows = math.ceil(len(models) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.4 * nrows), dpi=DPI)
    FigureCanvasAgg(fig)
    for k, model in enumerate(models):
        ax = fig.add_subplot(nrows, cols, k + 1)
        # a resumed run may log a step twice: keep the last record of each step
        t = (training[training["model"].astype(str) == model]
             .drop_duplicates("step", keep="last").sort_values("step"))
        ax.plot(t["step"], t["loss"], lw=1.2, label="loss")
        for column, label in CURVE_LINES:
            if column not in t or t[column].isna().all():
                continue
            v = t[t[column].notna()]
            if column == "objective" and np.allclose(v[column], v["loss"]):
                continue  # the loss is the objective (SFT, plain KD without a CE term)
            ax.plot(v["step"], v[column], "o-" if len(v) < len(t) else "-", ms=3, lw=1,
                    label=label)
        prob = next((c for c in OFF_POLICY_COLUMNS if c in t and t[c].notna().any()), None)
        if prob is not None:
            p = t[t[prob].notna()]
            twin = ax.twinx()
            twin.step(p["step"], p[prob], where="post", color="0.4", lw=1, ls=":")
            twin.set_ylim(-0.05, 1.05)
            twin.set_ylabel("P(student batch), dotted", fontsize="x-small")
            twin.tick_params(labelsize="x-small")
        ax.set_title(model, fontsize="small")
        ax.tick_params(labelsize="x-small")
        ax.grid(True, alpha=0.3)
        if k == 0 or len(ax.get_lines()) > 1:
            ax.legend(fontsize="x-small")
    fig.supxlabel("step", fontsize="small", y=0.15 / fig.get_figheight())
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.5 / width, right=1 - 0.6 / width, bottom=0.6 / height,
                        top=1 - 0.3 / height, wspace=0.45, hspace=0.55)
    return _save(fig, path)


FRONTIER_MARKERS = ("o", "s", "^", "v", "P", "X", "D", "*")
LOG_X_RATIO = 4.0  # perplexity on a log axis when max / min exceeds this


def privacy_utility_plot(points: pd.DataFrame | None, path: Path, *,
                         interval: str = "95% CI") -> Path | None:
    """The privacy–utility frontier (`frontier.frontier_points`): perplexity on non-members
    against the strongest signal's AUC (left, error bars `interval`) and TPR at 1% FPR
    (right). One
    series per DP method, its points joined in ε order and annotated with ε; non-private
    models (ids without "@") as single labelled grey points. None without a DP model."""
    if points is None or points.empty or not points["model"].astype(str).str.contains("@").any():
        return None
    dp = points["model"].astype(str).str.contains("@")
    fig = Figure(figsize=(11.5, 4.6), dpi=DPI)
    FigureCanvasAgg(fig)
    left = fig.add_subplot(1, 2, 1)
    axes = [left, fig.add_subplot(1, 2, 2, sharex=left)]
    methods = list(dict.fromkeys(points.loc[dp, "method"].astype(str)))
    panels = (("auc", "ci_low", "ci_high", 1.0, f"strongest signal's ROC AUC ({interval})"),
              ("tpr_at_1pct", "tpr_ci_low", "tpr_ci_high", 100.0,
               f"strongest signal's TPR at 1% FPR (%, {interval})"))
    for ax, (col, lo_col, hi_col, scale, ylabel) in zip(axes, panels):
        for i, method in enumerate(methods):
            s = points[dp & (points["method"].astype(str) == method)]
            s = s.assign(_e=s["epsilon"].fillna(math.inf)).sort_values("_e", kind="stable")
            s = s[s[col].notna()]
            if s.empty:
                continue
            y = s[col].to_numpy(float) * scale
            lo = (s[lo_col] if lo_col in s else s[col]).to_numpy(float) * scale
            hi = (s[hi_col] if hi_col in s else s[col]).to_numpy(float) * scale
            err = [np.nan_to_num(np.maximum(y - lo, 0)), np.nan_to_num(np.maximum(hi - y, 0))]
            ax.errorbar(s["perplexity"], y, yerr=err, color=f"C{i % 10}",
                        marker=FRONTIER_MARKERS[i % len(FRONTIER_MARKERS)], ms=6, lw=1.4,
                        capsize=2, elinewidth=0.8, label=method)
            for x, v, e in zip(s["perplexity"], y, s["epsilon"]):
                ax.annotate(eps_label(e), (x, v), textcoords="offset points", xytext=(6, 3),
                            fontsize="x-small", color=f"C{i % 10}")
        refs = points[~dp & points[col].notna()]
        for k, r in enumerate(refs.itertuples()):
            v = getattr(r, col) * scale
            ax.scatter([r.perplexity], [v], marker="D", s=34, color="0.3", zorder=3,
                       label="non-private (labelled)" if k == 0 else None)
            ax.annotate(str(r.model), (r.perplexity, v), textcoords="offset points",
                        xytext=(5, -10), fontsize="x-small", color="0.2")
        if col == "auc":
            ax.axhline(0.5, ls="--", lw=1, color="0.3", label="chance (0.5)")
        elif points[col].notna().any():
            ax.axhline(1.0, ls=":", lw=1, color="0.3", label="chance (1%)")
            ax.set_ylim(bottom=0)
        else:
            ax.text(0.5, 0.5, "TPR at 1% FPR not reachable\n(too few non-members)",
                    transform=ax.transAxes, ha="center", va="center", color="0.4")
            ax.set_yticks([])
        ppl = points["perplexity"].to_numpy(float)
        ppl = ppl[np.isfinite(ppl) & (ppl > 0)]
        if len(ppl) and ppl.max() / ppl.min() > LOG_X_RATIO:
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))  # 10, 20, 50, …
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.margins(x=0.1, y=0.08)  # room for the ε labels at the edges
        ax.set_xlabel("perplexity on non-members (lower is better)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_title("Privacy–utility frontier: AUC", fontsize="medium")
    axes[1].set_title("Privacy–utility frontier: TPR at 1% FPR", fontsize="medium")
    # one legend for both panels: the DP methods first, then the references
    found: dict[str, object] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            found.setdefault(lab, h)
    labels = [m for m in methods if m in found] + [m for m in found if m not in methods]
    width, height = fig.get_size_inches()
    fig.legend([found[lab] for lab in labels], labels, loc="upper left", fontsize="small",
               bbox_to_anchor=(1 - 2.05 / width, 1 - 0.4 / height))
    fig.subplots_adjust(left=0.7 / width, right=1 - 2.2 / width, bottom=0.6 / height,
                        top=1 - 0.4 / height, wspace=0.3)
    return _save(fig, path)
