"""Compare two run folders: every tables/*.csv, scores/*.parquet and private/*.parquet must be
identical, value for value (wall-clock columns aside). For refactors that must not change
results: run the same preset with the old and the new code, then

    python tools/compare_runs.py OLD/runs/smoke NEW/runs/smoke

Exits 1 when a file is missing on one side or differs.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

PATTERNS = ("tables/*.csv", "scores/*.parquet", "private/*.parquet")


def result_files(run: Path) -> set[Path]:
    return {p.relative_to(run) for pattern in PATTERNS for p in run.glob(pattern)}


def read(path: Path) -> pd.DataFrame:
    frame = pd.read_csv(path) if path.suffix == ".csv" else pd.read_parquet(path)
    return frame.drop(columns=[c for c in frame if "time" in c or "second" in c])


def main(a: Path, b: Path) -> int:
    files_a, files_b = result_files(a), result_files(b)
    bad = sorted(files_a ^ files_b)
    for rel in bad:
        print(f"only in {a if rel in files_a else b}: {rel}")
    for rel in sorted(files_a & files_b):
        try:
            pd.testing.assert_frame_equal(read(a / rel), read(b / rel), check_exact=True)
            print(f"identical {rel}")
        except AssertionError as e:
            bad.append(rel)
            print(f"DIFFERS {rel}: {str(e)[:300]}")
    print("all identical" if not bad else f"{len(bad)} file(s) differ or are missing")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2])))
