"""A benchmark suite's runs of one variant, summarised across seeds: the tables behind its
reference report (`kdaudit.report.benchmark`), each a pure function of the runs' tables and
per-record scores.

    tables = suite_tables(run_dirs, n_bootstrap=1000)   # name → DataFrame
    tables["metrics"]       # AUC and TPR at 1% FPR per model and signal: mean, sd, min, max
    tables["paired_tests"]  # every model against nokd: ΔAUC, 95% CI, p, verdict

The paired test draws seeds with replacement, then members and non-members within each seed
(the same records for both models): a model "leaks more than nokd" only when the whole 95%
interval of ΔAUC lies above zero.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

# models that are not students distilled from the teacher
NOT_STUDENTS = {"nokd", "data", "teacher", "base_teacher", "base_student"}
RATIO_FLOOR = 0.55          # teacher AUC below which a teacher → student ratio divides by noise
ROC_GRID = np.concatenate([[0.0], np.logspace(-3, 0, 61)])   # FPRs of the averaged ROC
SPREAD_METRICS = ("auc", "tpr_at_1pct")


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by ranks (ties averaged): the Mann–Whitney statistic."""
    from scipy.stats import rankdata

    ranks = rankdata(scores)
    n1 = int(labels.sum())
    n0 = len(labels) - n1
    return float((ranks[labels == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def paired_auc_test(pairs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], *,
                    n_bootstrap: int = 1000, seed: int = 0) -> dict[str, float]:
    """ΔAUC = AUC(model) − AUC(baseline), averaged over seeds, with a paired hierarchical
    bootstrap: seeds drawn with replacement, then members and non-members within each seed,
    the same records for both models. `pairs` holds (labels, model scores, baseline scores)
    per seed. Returns the observed Δ, its 95% interval and the two-sided bootstrap p-value."""
    rng = np.random.default_rng(seed)
    observed = float(np.mean([auc(y, a) - auc(y, b) for y, a, b in pairs]))
    draws = np.empty(n_bootstrap)
    for i in range(n_bootstrap):
        picked = rng.integers(len(pairs), size=len(pairs)) if len(pairs) > 1 else [0]
        deltas = []
        for k in picked:
            y, a, b = pairs[k]
            idx = np.concatenate([rng.choice(np.flatnonzero(y == c), size=int((y == c).sum()))
                                  for c in (1, 0)])
            deltas.append(auc(y[idx], a[idx]) - auc(y[idx], b[idx]))
        draws[i] = np.mean(deltas)
    low, high = np.percentile(draws, [2.5, 97.5])
    p = min(1.0, 2 * min((draws <= 0).mean(), (draws >= 0).mean()))
    return {"delta": observed, "ci_low": float(low), "ci_high": float(high), "p": float(p)}


def verdict(test: dict[str, float]) -> str:
    if test["ci_low"] > 0:
        return "leaks more than nokd"
    if test["ci_high"] < 0:
        return "leaks less than nokd"
    return "no significant difference"


def _scores(run_dir: Path, model: str) -> pd.DataFrame | None:
    path = run_dir / "scores" / f"{model}.parquet"
    return pd.read_parquet(path).set_index("record_id") if path.exists() else None


def _scored_models(run_dirs: Sequence[Path]) -> list[str]:
    """Models with per-record scores in every run, in the first run's file order."""
    names = [p.stem for p in sorted((run_dirs[0] / "scores").glob("*.parquet"))]
    return [m for m in names if all((d / "scores" / f"{m}.parquet").exists() for d in run_dirs)]


def _signal_columns(scores: pd.DataFrame) -> list[str]:
    return [c for c in scores.columns if c not in ("label", "category")]


def _read(run_dirs: Sequence[Path], table: str) -> pd.DataFrame:
    frames = [pd.read_csv(d / "tables" / f"{table}.csv").assign(run=i)
              for i, d in enumerate(run_dirs) if (d / "tables" / f"{table}.csv").exists()]
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def spread(frame: pd.DataFrame, keys: Sequence[str], value: str = "value") -> pd.DataFrame:
    """Per `keys`: mean, sd (ddof 1), min, max and count of `value` over the runs."""
    if frame.empty:
        return pd.DataFrame(columns=[*keys, "mean", "sd", "low", "high", "seeds"])
    frame = frame.assign(**{value: pd.to_numeric(frame[value], errors="coerce")})
    return (frame.groupby(list(keys), sort=False)[value]
            .agg(mean="mean", sd="std", low="min", high="max", seeds="count").reset_index())


def metric_spread(run_dirs: Sequence[Path]) -> pd.DataFrame:
    """AUC and TPR at 1% FPR per model and signal (the runs' mia tables) across the runs,
    with the number of non-members each run's ROC had."""
    mia = _read(run_dirs, "mia")
    rows = mia[mia["metric"].isin(SPREAD_METRICS)]
    out = spread(rows, ["model", "signal", "metric"])
    if "n_nonmembers" in rows:
        n = rows.groupby(["model", "signal", "metric"], sort=False)["n_nonmembers"].min()
        out = out.join(n, on=["model", "signal", "metric"])
    return out


def paired_tests(run_dirs: Sequence[Path], n_bootstrap: int) -> pd.DataFrame:
    """Every scored model but the non-students' baselines against `nokd`, per signal."""
    columns = ["model", "signal", "delta", "ci_low", "ci_high", "p", "seeds", "n_bootstrap",
               "verdict"]
    if not all((d / "scores" / "nokd.parquet").exists() for d in run_dirs):
        return pd.DataFrame(columns=columns)
    baselines = [_scores(d, "nokd") for d in run_dirs]
    tests = []
    for model in _scored_models(run_dirs):
        if model in NOT_STUDENTS:
            continue
        frames = [_scores(d, model) for d in run_dirs]
        for signal in [s for s in _signal_columns(frames[0]) if s in baselines[0]]:
            pairs = []
            for a, b in zip(frames, baselines):
                joined = a[["label", signal]].join(b[[signal]], rsuffix="_base").dropna()
                pairs.append((joined["label"].to_numpy(int), joined[signal].to_numpy(float),
                              joined[f"{signal}_base"].to_numpy(float)))
            t = paired_auc_test(pairs, n_bootstrap=n_bootstrap)
            tests.append({"model": model, "signal": signal, **t, "seeds": len(pairs),
                          "n_bootstrap": n_bootstrap, "verdict": verdict(t)})
    return pd.DataFrame(tests, columns=columns)


def roc_across_seeds(run_dirs: Sequence[Path]) -> pd.DataFrame:
    """Each model's ROC per signal, vertically averaged over the runs: at every FPR of
    `ROC_GRID`, the mean (and sd) of the runs' TPR, each run's curve interpolated linearly."""
    from sklearn.metrics import roc_curve

    rows = []
    for model in _scored_models(run_dirs):
        frames = [_scores(d, model) for d in run_dirs]
        for signal in _signal_columns(frames[0]):
            tprs = []
            for f in frames:
                f = f[["label", signal]].dropna()
                if f["label"].nunique() == 2:
                    fpr, tpr, _ = roc_curve(f["label"].to_numpy(int), f[signal].to_numpy(float))
                    tprs.append(np.interp(ROC_GRID, fpr, tpr))
            if tprs:
                t = np.vstack(tprs)
                sd = t.std(axis=0, ddof=1) if len(tprs) > 1 else np.full(len(ROC_GRID), np.nan)
                rows += [{"model": model, "signal": signal, "fpr": x, "tpr": m, "tpr_sd": s}
                         for x, m, s in zip(ROC_GRID, t.mean(axis=0), sd)]
    return pd.DataFrame(rows, columns=["model", "signal", "fpr", "tpr", "tpr_sd"])


def by_category(run_dirs: Sequence[Path], signal: str = "loss") -> pd.DataFrame:
    """AUC of `signal` per model and task category, the mean over the runs (categories with
    both members and non-members only)."""
    rows = []
    for d in run_dirs:
        for path in sorted((d / "scores").glob("*.parquet")):
            scores = pd.read_parquet(path)
            if signal not in scores or "category" not in scores or path.stem == "data":
                continue
            for category, g in scores.dropna(subset=[signal]).groupby("category"):
                if g["label"].nunique() == 2:
                    rows.append({"model": path.stem, "category": category,
                                 "auc": auc(g["label"].to_numpy(int), g[signal].to_numpy(float))})
    if not rows:
        return pd.DataFrame(columns=["model", "category", "auc"])
    return pd.DataFrame(rows).groupby(["model", "category"], sort=False)["auc"].mean() \
        .reset_index()


def leakage_ratios(metrics: pd.DataFrame) -> pd.DataFrame:
    """Per student and signal: (AUC − ½) / (teacher's AUC − ½), mean AUCs over the seeds:
    the share of the teacher's advantage over chance that the student kept; only where the
    teacher reaches `RATIO_FLOOR` (nearer ½ the ratio divides by noise)."""
    aucs = metrics[metrics["metric"] == "auc"] if "metric" in metrics else metrics
    teacher = aucs[aucs["model"] == "teacher"].set_index("signal")["mean"]
    rows = []
    for r in aucs[~aucs["model"].isin(NOT_STUDENTS)].itertuples():
        if r.signal in teacher and teacher[r.signal] >= RATIO_FLOOR:
            rows.append({"model": r.model, "signal": r.signal,
                         "ratio": (r.mean - 0.5) / (teacher[r.signal] - 0.5)})
    return pd.DataFrame(rows, columns=["model", "signal", "ratio"])


def run_facts(run_dirs: Sequence[Path]) -> pd.DataFrame:
    """Per run: its seed, the seconds its stages took (summed over resumptions, from the
    manifest), and the wall time and peak resident memory its `benchmark_done.json` records
    (NaN for a run finished before those were recorded)."""
    rows = []
    for d in run_dirs:
        manifest, done = d / "manifest.json", d / "benchmark_done.json"
        manifest = json.loads(manifest.read_text()) if manifest.exists() else {}
        facts = json.loads(done.read_text()) if done.exists() else {}
        stages = manifest.get("stages")
        rows.append({"run": d.name, "seed": facts.get("seed", manifest.get("seed")),
                     "stage_seconds": round(sum(s.get("seconds", 0.0) for s in stages.values()),
                                            1) if stages else math.nan,
                     "wall_seconds": facts.get("wall_seconds", math.nan),
                     "peak_rss_mib": facts.get("peak_rss_mib", math.nan)})
    return pd.DataFrame(rows)


def suite_tables(run_dirs: Sequence[Path], *, n_bootstrap: int = 1000) -> dict[str, pd.DataFrame]:
    """Every table of the reference report, by file name (without .csv)."""
    metrics = metric_spread(run_dirs)
    models = _read(run_dirs[:1], "models").drop(columns="run", errors="ignore")
    return {
        "metrics": metrics,
        "paired_tests": paired_tests(run_dirs, n_bootstrap),
        "teacher_to_student": leakage_ratios(metrics),
        "auc_by_category": by_category(run_dirs),
        "roc": roc_across_seeds(run_dirs),
        "utility": spread(_read(run_dirs, "utility"), ["model", "metric", "split"]),
        "memorization": spread(_read(run_dirs, "memorization"), ["model", "metric", "split"]),
        "privacy": spread(_read(run_dirs, "privacy"), ["model", "metric"]),
        "blocks": _block_spread(_read(run_dirs, "blocks")),
        "models": models,
        "runs": run_facts(run_dirs),
    }


def _block_spread(blocks: pd.DataFrame) -> pd.DataFrame:
    if blocks.empty:
        return pd.DataFrame(columns=["model", "block", "n_blocks", "mean", "sd", "low", "high",
                                     "seeds"])
    return spread(blocks, ["model", "block", "n_blocks"], value="auc")
