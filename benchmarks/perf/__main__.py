"""Every speed benchmark in one run: `python -m benchmarks.perf` (or `make bench`).

Each benchmark measures its pair side by side in one process (never against a number from
another run), prints its ratio and its absolute figures; this runs them one after the other
and writes `benchmarks/perf/RESULTS.md`: the ratios first, then each benchmark's full output,
labelled with the machine. A benchmark that fails is reported with all of its output.
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = (
    ("Scoring: the shared pass vs the bare forward pass and vs one pass per signal per record",
     "bench_scoring.py", []),
    ("Per-block MoPe: the clean prefix once per block vs the full forward per perturbation",
     "bench_mope.py", []),
    ("Sampling and memorization: batched KV cache vs recomputing the prefix, vs one prompt at "
     "a time", "bench_sampling.py", []),
    ("Canary exposure: the candidates' shared prefix once vs every candidate in full",
     "bench_canaries.py", []),
    ("Off-policy KD: the teacher every step vs the teacher cache", "bench_teacher_cache.py", []),
    ("DP-SGD step vs non-DP step (Opacus per-sample gradients)", "bench_dpsgd.py", []),
    ("End to end: kdaudit run --preset smoke, per stage", "bench_end_to_end.py", []),
    ("Sharing the CPU: thread policies alone and beside a competitor", "bench_threads.py",
     ["--steps", "20"]),
)
RATIO_WORDS = ("×", "speed-up", "ratio")


def machine() -> str:
    import torch

    from kdaudit.models import compute_device

    return (f"{platform.platform()}, {os.cpu_count()} CPUs, Python "
            f"{platform.python_version()}, torch {torch.__version__}, compute device "
            f"{compute_device()}, {torch.get_num_threads()} torch threads")


def main() -> int:
    sections, ratios, failed = [], [], 0
    for title, script, args in BENCHES:
        print(f"== {title}", flush=True)
        t0 = time.time()
        proc = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True,
                              text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        out = proc.stdout.strip()
        print(out, flush=True)
        if proc.returncode:
            failed += 1
            print(proc.stderr, file=sys.stderr)
            out += f"\n\nFAILED (exit {proc.returncode}):\n{proc.stderr.strip()}"
        ratios += [f"- {title}: {line.strip()}" for line in out.splitlines()
                   if any(w in line for w in RATIO_WORDS)]
        sections += [f"## {title}", "", f"`{script} {' '.join(args)}`".replace(" `", "`"),
                     f"({time.time() - t0:.0f} s)", "", "```", out, "```", ""]
    text = ["# Speed benchmarks", "",
            f"Measured {datetime.date.today()} on: {machine()}.", "",
            "## Ratios", "", *ratios, "", *sections]
    (HERE / "RESULTS.md").write_text("\n".join(text))
    print(f"wrote {HERE / 'RESULTS.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
