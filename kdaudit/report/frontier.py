"""The privacy–utility frontier of differentially private distillation (docs/methods.md §5–§7, §9, §13):
one point per (method, ε) with the student's perplexity on non-members, its strongest
membership signal, and the ε its accountant gives beside the empirical lower bound.

Each model's method, ε and whether a DP recipe trained it (the ε = ∞ variant of a DP method
included) come from the model table's `method`, `epsilon` and `private` columns, set where
the model was named; a table without them makes every model its own non-private method.
"""
from __future__ import annotations

import math
from typing import Sequence

import pandas as pd

from kdaudit.report.tables import UTILITY_FORMATS, Table, fmt_ci, model_order, num, unreachable
from kdaudit.report.verdicts import MODEL_FREE_SIGNALS

FRONTIER_ROLES = ("student", "baseline")
ACCOUNTED = "epsilon_accounted"
LOWER_BOUND = "epsilon_lower_bound_one_run"
WHITE_BOX = "epsilon_lower_bound_white_box"
COLUMNS = ["model", "method", "epsilon", "private", "perplexity", "signal", "auc", "ci_low", "ci_high",
           "tpr_at_1pct", "tpr_ci_low", "tpr_ci_high", "tpr_note", "n_nonmembers",
           "epsilon_accounted", "epsilon_lower_bound", "epsilon_lower_bound_white_box"]


def model_facts(models: pd.DataFrame | None) -> dict[str, tuple[str, float, bool]]:
    """model → (method, ε, private) from the model table's columns."""
    if models is None or models.empty or "method" not in models:
        return {}
    eps = models["epsilon"] if "epsilon" in models else [math.inf] * len(models)
    private = models["private"] if "private" in models else [False] * len(models)
    return {str(m): (str(k), num(e), bool(p))
            for m, k, e, p in zip(models["model"], models["method"], eps, private)}


def eps_label(epsilon: float) -> str:
    """"ε=2", "ε=0.5", "ε=∞" ("ε=?" when unknown)."""
    if math.isnan(epsilon):
        return "ε=?"
    return "ε=∞" if math.isinf(epsilon) else f"ε={epsilon:g}"


def _metric(frame: pd.DataFrame | None, metric: str) -> dict[str, float]:
    """model → value of `metric` in a privacy frame (the largest, where a model has several
    rows: one per DP-SGD run of its recipe)."""
    if frame is None or frame.empty or "metric" not in frame:
        return {}
    rows = frame[frame["metric"].astype(str) == metric]
    values = pd.to_numeric(rows["value"], errors="coerce").groupby(rows["model"].astype(str),
                                                                    sort=False).max()
    return {str(m): num(v) for m, v in values.items()}


def _perplexity(utility: pd.DataFrame | None) -> dict[str, float]:
    """model → perplexity on non-members (any split where the frame has no split column)."""
    if utility is None or utility.empty:
        return {}
    rows = utility[utility["metric"].astype(str) == "perplexity"]
    if "split" in rows:
        rows = rows[rows["split"].astype(str) == "nonmembers"]
    rows = rows.assign(v=pd.to_numeric(rows["value"], errors="coerce")).dropna(subset=["v"])
    return {str(m): float(v) for m, v in zip(rows["model"], rows["v"])}


def frontier_points(mia: pd.DataFrame | None, utility: pd.DataFrame | None,
                    privacy: pd.DataFrame | None, models: pd.DataFrame | None) -> pd.DataFrame:
    """One row per student or baseline model (every model when `models` has no roles) that
    has a perplexity on non-members, with the COLUMNS above: method, ε and `private` from the
    model table (`model_facts`), the model signal with the highest AUC and its CI, the TPR at 1%
    FPR of that same signal (NaN when missing or not reachable; `tpr_note` then says why),
    signal NaN when the model has no AUC,
    the accounted ε and the one-run lower bound (NaN where there is none).

    Rows: DP models grouped by method (in model order), ε ascending with ∞ last, then the
    non-private models in model order.
    """
    ppl = _perplexity(utility)
    order = model_order(models, utility)
    if models is not None and not models.empty and "role" in models:
        keep = {str(m) for m, r in zip(models["model"], models["role"])
                if str(r) in FRONTIER_ROLES}
        order = [m for m in order if m in keep]
    order = [m for m in order if m in ppl and m != "data"]

    auc, tpr = pd.DataFrame(), pd.DataFrame()
    if mia is not None and not mia.empty:
        rows = mia[~mia["signal"].isin(MODEL_FREE_SIGNALS) & (mia["model"].astype(str) != "data")]
        rows = rows.assign(model=rows["model"].astype(str), signal=rows["signal"].astype(str),
                           value=pd.to_numeric(rows["value"], errors="coerce"))
        auc = rows[rows["metric"] == "auc"].dropna(subset=["value"])
        tpr = rows[rows["metric"] == "tpr_at_1pct"].drop_duplicates(["model", "signal"])
        tpr = tpr.set_index(["model", "signal"])
    accounted, bound = _metric(privacy, ACCOUNTED), _metric(privacy, LOWER_BOUND)
    white_box = _metric(privacy, WHITE_BOX)

    facts = model_facts(models)
    points = []
    for model in order:
        method, epsilon, private = facts.get(model, (model, math.inf, False))
        p = dict.fromkeys(COLUMNS, math.nan)
        p.update(model=model, method=method, epsilon=epsilon, private=private,
                 perplexity=ppl[model],
                 signal=None, tpr_note=None, epsilon_accounted=accounted.get(model, math.nan),
                 epsilon_lower_bound=bound.get(model, math.nan),
                 epsilon_lower_bound_white_box=white_box.get(model, math.nan))
        own = auc[auc["model"] == model] if len(auc) else auc
        if len(own):
            best = own.loc[own["value"].idxmax()]
            p.update(signal=best["signal"], auc=float(best["value"]),
                     ci_low=num(best.get("ci_low")), ci_high=num(best.get("ci_high")),
                     n_nonmembers=num(best.get("n_nonmembers")))
            if (model, best["signal"]) in tpr.index:
                t = tpr.loc[(model, best["signal"])]
                p.update(tpr_at_1pct=num(t["value"]), tpr_ci_low=num(t.get("ci_low")),
                         tpr_ci_high=num(t.get("ci_high")))
                if math.isnan(p["tpr_at_1pct"]):
                    p["tpr_note"] = unreachable(t.get("n_nonmembers"))
        points.append(p)
    frame = pd.DataFrame(points, columns=COLUMNS)
    if frame.empty:
        return frame
    private = frame["private"].astype(bool)
    methods = list(dict.fromkeys(frame.loc[private, "method"]))
    frame["_ref"] = ~private
    frame["_method"] = frame["method"].map({m: i for i, m in enumerate(methods)}).fillna(0)
    frame["_eps"] = frame["epsilon"].where(private, 0.0).fillna(math.inf)
    frame["_pos"] = range(len(frame))
    frame = frame.sort_values(["_ref", "_method", "_eps", "_pos"], kind="stable")
    return frame.drop(columns=["_ref", "_method", "_eps", "_pos"]).reset_index(drop=True)


def has_dp(points: pd.DataFrame | None) -> bool:
    """True when any point is a model a DP recipe trained."""
    return points is not None and not points.empty and bool(points["private"].astype(bool).any())


def _fmt_eps(x: float) -> str:
    return "—" if math.isnan(x) else ("∞" if math.isinf(x) else f"{x:.2f}")


def frontier_table(points: pd.DataFrame) -> Table:
    """The numbers behind the frontier figure, one row per point."""
    rows, classes = [], []
    for p in points.itertuples():
        accounted = _fmt_eps(p.epsilon_accounted)
        if math.isinf(p.epsilon) and math.isnan(p.epsilon_accounted):
            accounted = "∞ (non-private)"
        if pd.isna(p.signal):
            auc, tpr = "—", "—"
        else:
            auc = fmt_ci(p.auc, p.ci_low, p.ci_high)
            tpr = ("—" if pd.isna(p.tpr_note) else str(p.tpr_note)) if math.isnan(
                p.tpr_at_1pct) else fmt_ci(p.tpr_at_1pct, p.tpr_ci_low, p.tpr_ci_high, pct=True)
        violated = max(p.epsilon_lower_bound, p.epsilon_lower_bound_white_box) > \
            p.epsilon_accounted   # False when any is NaN
        rows.append([str(p.model), str(p.method), accounted, _fmt_eps(p.epsilon_lower_bound),
                     _fmt_eps(p.epsilon_lower_bound_white_box),
                     UTILITY_FORMATS["perplexity"].format(p.perplexity),
                     "—" if pd.isna(p.signal) else str(p.signal), auc, tpr])
        classes.append("elevated" if violated else "")
    return Table(["Model", "Method", "ε accounted", "ε lower bound (one run, canaries)",
                  "ε lower bound (white box)", "Perplexity",
                  "Strongest signal", "AUC [95% CI]", "TPR @ 1% FPR"], rows, classes)


def accounting_violations(privacy: pd.DataFrame | None,
                          order: Sequence[str] = ()) -> list[tuple[str, float, float]]:
    """(model, lower bound, accounted ε) for every model whose one-run empirical lower bound
    (black box, canary records; or white box, gradient canaries) exceeds the ε its accountant
    gives: the accounting (or the implementation) is wrong."""
    accounted = _metric(privacy, ACCOUNTED)
    bounds = [_metric(privacy, LOWER_BOUND), _metric(privacy, WHITE_BOX)]
    names = [*order, *(m for m in accounted if m not in order)]
    out = []
    for m in names:
        found = [b[m] for b in bounds if m in b and not math.isnan(b[m])]
        if m in accounted and found and max(found) > accounted[m]:
            out.append((m, max(found), accounted[m]))
    return out


def lmo_claim_warning(privacy: pd.DataFrame | None) -> str | None:
    """docs/methods.md §6: where a lower bound on an LMO-DP model's true ε (the PLD of its noise,
    or a one-run audit: canary records or gradient canaries) exceeds the ε the method claims,
    the claim does not hold."""
    claimed = _metric(privacy, "epsilon_claimed_lmo")
    found = (("PLD", _metric(privacy, "epsilon_lower_bound_lmo_pld")),
             ("one-run audit", _metric(privacy, LOWER_BOUND)),
             ("white-box audit", _metric(privacy, WHITE_BOX)))
    parts = []
    for m, eps in claimed.items():
        bounds = [(name, b[m]) for name, b in found if m in b and b[m] > eps]
        if bounds:
            parts.append(f"{m}: claimed ε {eps:.3f} < " +
                         " and ".join(f"{v:.3f} ({name})" for name, v in bounds))
    if not parts:
        return None
    return ("The LMO-DP privacy claim does not hold: a lower bound on the true ε exceeds the "
            "ε the method claims (" + "; ".join(parts) + ").")


def violation_warning(violations: Sequence[tuple[str, float, float]]) -> str | None:
    """The loud sentence for models whose lower bound exceeds their accounted ε."""
    if not violations:
        return None
    parts = "; ".join(f"{m}: empirical lower bound {lb:.2f} > accounted ε {acc:.2f}"
                      for m, lb, acc in violations)
    many = len(violations) > 1
    return (f"Warning: the privacy accounting (or the DP-SGD implementation) is wrong for "
            f"{'these models' if many else 'this model'} ({parts}). A rigorous empirical lower "
            f"bound cannot exceed a valid DP guarantee, so the accounted ε of "
            f"{'these models' if many else 'this model'} does not hold.")
