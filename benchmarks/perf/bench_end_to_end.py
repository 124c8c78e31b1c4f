"""End to end: `kdaudit run` on presets, wall time, peak resident memory and time per stage.

    .venv/bin/python benchmarks/perf/bench_end_to_end.py [--presets smoke] [--keep DIR]

Each preset runs in a fresh output folder in its own process (the pretrained bases come from
the machine's cache, as in `make demo` after its first run). The tiny preset takes about a
quarter of an hour on a 2-core CPU: pass `--presets smoke,tiny` to include it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KDAUDIT = [sys.executable, "-m", "kdaudit"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="smoke")
    ap.add_argument("--keep", help="run in this folder and keep it (default: a temporary one)")
    args = ap.parse_args()

    root = Path(args.keep or tempfile.mkdtemp(prefix="kdaudit-e2e-"))
    for preset in args.presets.split(","):
        out = root / preset
        t0 = time.perf_counter()
        proc = subprocess.run([*KDAUDIT, "run", "--preset", preset, "--out", str(out)],
                              capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - t0
        if proc.returncode:
            print(proc.stdout, proc.stderr, sep="\n", file=sys.stderr)
            return proc.returncode
        # a child's peak is only known once it has exited: this is the largest child so far
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        manifests = sorted(out.rglob("manifest.json"))
        stages = {}
        for path in manifests:
            for name, stage in json.loads(path.read_text())["stages"].items():
                stages[name] = stages.get(name, 0.0) + (stage.get("seconds") or 0.0)
        print(f"{preset}: wall {wall:.0f} s, peak resident memory {peak:.0f} MiB "
              f"(largest process so far), {len(stages)} stages")
        for name, seconds in sorted(stages.items(), key=lambda kv: -kv[1]):
            print(f"  {name:28s} {seconds:7.1f} s  {seconds / wall:5.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
