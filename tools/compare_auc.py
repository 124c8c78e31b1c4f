"""Compare the AUC tables of two runs within a tolerance: a run on other hardware (a GPU, other
kernels, other float reductions) trains other weights, so its table cannot be identical.

    python tools/compare_auc.py RUN_A RUN_B --tolerance 0.05
    python tools/compare_auc.py benchmarks/perf/tiny_cpu_auc.csv RUN_B --tolerance 0.05

RUN is a run folder (its tables/mia.csv) or a CSV with model, signal, value columns. Prints
the largest difference per model and exits 1 when any (model, signal) AUC differs by more than
the tolerance, or is present on one side only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd


def auc_table(source: Path) -> pd.Series:
    frame = pd.read_csv(source if source.suffix == ".csv" else source / "tables" / "mia.csv")
    if "metric" in frame:
        frame = frame[frame["metric"] == "auc"]
    values = pd.to_numeric(frame["value"], errors="coerce")
    return pd.Series(values.to_numpy(), index=pd.MultiIndex.from_frame(
        frame[["model", "signal"]])).dropna()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--tolerance", type=float, default=0.05)
    args = ap.parse_args(argv)
    a, b = auc_table(args.a), auc_table(args.b)
    only = sorted(set(a.index) ^ set(b.index))
    diff = (a - b).abs().dropna()
    for model, d in diff.groupby(level=0):
        print(f"{model:<16} max |ΔAUC| {d.max():.4f} ({d.idxmax()[1]})")
    if only:
        print(f"present on one side only: {only}")
    bad = diff[diff > args.tolerance]
    print(f"largest |ΔAUC| {diff.max():.4f}; tolerance {args.tolerance}: "
          f"{'FAIL' if len(bad) or only else 'ok'}")
    return 1 if len(bad) or only else 0


if __name__ == "__main__":
    sys.exit(main())
