"""Per-model risk verdicts from the membership-inference table (docs/methods.md §9).

A model's risk on a signal is *elevated* when the lower end of its AUC confidence interval
exceeds the upper end of the baseline model's AUC interval for the same signal; for the
baseline itself, or when there is no baseline, the comparison is with chance (AUC 0.5).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd

from attacks.metrics import is_elevated
from attacks.mia import MODEL_FREE

# Signals that do not look at the model (they check the split): never evidence of leakage.
MODEL_FREE_SIGNALS = frozenset(MODEL_FREE)


@dataclass(frozen=True)
class SignalCheck:
    """One model × signal comparison of AUC intervals."""

    model: str
    signal: str
    auc: float
    ci_low: float
    ci_high: float
    baseline_auc: float  # NaN when compared with chance
    baseline_ci: tuple[float, float] | None  # None: compared with chance
    elevated: bool


def _num(x: object) -> float:
    """A float, with None / NaN / non-numbers as NaN."""
    try:
        return float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.nan


def _elevated(lo: float, hi: float, baseline_ci: tuple[float, float] | None) -> bool:
    """`attacks.metrics.is_elevated`, False where an interval is missing (NaN)."""
    if any(math.isnan(v) for v in (lo, hi, *(baseline_ci or ()))):
        return False
    return is_elevated((lo, hi), baseline_ci)


def _ordered_unique(values: pd.Series) -> list[str]:
    return [str(v) for v in dict.fromkeys(values.tolist())]


def signal_checks(mia: pd.DataFrame, baseline: str = "nokd") -> list[SignalCheck]:
    """Compare every model × signal AUC with the baseline's (see the module docstring)."""
    auc = mia[(mia["metric"] == "auc") & ~mia["signal"].isin(MODEL_FREE_SIGNALS)]
    auc = auc.drop_duplicates(["model", "signal"], keep="first")
    base = {str(r.signal): r for r in auc[auc["model"] == baseline].itertuples()}
    checks = []
    for r in auc.itertuples():
        model, signal = str(r.model), str(r.signal)
        b = None if model == baseline else base.get(signal)
        baseline_ci = None if b is None else (_num(b.ci_low), _num(b.ci_high))
        lo = _num(r.ci_low)
        checks.append(SignalCheck(model, signal, _num(r.value), lo, _num(r.ci_high),
                                  math.nan if b is None else _num(b.value), baseline_ci,
                                  _elevated(lo, _num(r.ci_high), baseline_ci)))
    return checks


def _fmt_auc(value: float, lo: float, hi: float) -> str:
    if math.isnan(lo) or math.isnan(hi):
        return f"{value:.2f}"
    return f"{value:.2f} [{lo:.2f}, {hi:.2f}]"


def _auc_phrase(c: SignalCheck, parenthesised: bool = True) -> str:
    """"loss (AUC 0.66 [0.63, 0.69] vs 0.51 [0.48, 0.53])", or "loss, AUC …" without
    the parentheses."""
    auc = f"AUC {_fmt_auc(c.auc, c.ci_low, c.ci_high)}"
    if c.baseline_ci is not None:
        auc += f" vs {_fmt_auc(c.baseline_auc, *c.baseline_ci)}"
    return f"{c.signal} ({auc})" if parenthesised else f"{c.signal}, {auc}"


def _reference(c: SignalCheck, baseline: str) -> str:
    return f"the {baseline} baseline" if c.baseline_ci is not None else "chance (AUC 0.5)"


def _tpr_at_1pct(mia: pd.DataFrame, model: str, signal: str) -> float:
    rows = mia[(mia["model"] == model) & (mia["signal"] == signal)
               & (mia["metric"] == "tpr_at_1pct")]
    return _num(rows["value"].iloc[0]) if len(rows) else math.nan


def _strongest(checks: list[SignalCheck]) -> SignalCheck:
    """The check with the highest AUC (NaN AUCs last)."""
    return max(checks, key=lambda c: -math.inf if math.isnan(c.auc) else c.auc)


def verdicts(mia: pd.DataFrame, baseline: str = "nokd") -> pd.DataFrame:
    """One row per model: model, verdict ("elevated" | "not elevated"), signals, text."""
    checks = signal_checks(mia, baseline)
    rows = []
    model_based = mia[~mia["signal"].isin(MODEL_FREE_SIGNALS)]   # the split check has no verdict
    for model in _ordered_unique(model_based["model"]):
        own = [c for c in checks if c.model == model]
        elevated = [c for c in own if c.elevated]
        if not own:
            text = "No AUC results, so no verdict could be formed."
        elif elevated:
            best = _strongest(elevated)
            others = len(elevated) - 1
            text = (f"Elevated risk. Membership is detectable above "
                    f"{_reference(best, baseline)} by {_auc_phrase(best)}")
            if others:
                text += f" and {others} other signal{'s' if others > 1 else ''}"
            text += "."
            tpr = _tpr_at_1pct(mia, model, best.signal)
            if not math.isnan(tpr):
                text += (f" An attacker using {best.signal} who accepts 1% false alarms "
                         f"would correctly flag {100 * tpr:.1f}% of the private training "
                         "records (members).")
        else:
            best = _strongest(own)
            text = (f"No leakage detected above {_reference(best, baseline)} at 95% "
                    f"confidence (strongest signal: {_auc_phrase(best, parenthesised=False)}).")
        rows.append({"model": model, "verdict": "elevated" if elevated else "not elevated",
                     "signals": [c.signal for c in elevated], "text": text})
    return pd.DataFrame(rows, columns=["model", "verdict", "signals", "text"])
