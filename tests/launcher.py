"""Run a command under torchrun on two CPU processes, every rank's output kept for the
failure message (used by the tests of launched runs)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def torchrun(args: list[str], logs: Path, *, env: dict[str, str] | None = None,
             timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --standalone --nproc_per_node 2 ARGS`. --standalone:
    the rendezvous store takes a free port from the OS (never a fixed one); --tee 3 and
    --log-dir keep every rank's stdout and stderr, printed whole when the run fails."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", **(env or {})}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "--log-dir", str(logs), "--tee", "3", *args],
                         capture_output=True, text=True, env=env, timeout=timeout)
    if run.returncode != 0:
        ranks = "\n".join(f"--- {p.relative_to(logs)}\n{p.read_text(errors='replace')}"
                          for p in sorted(logs.rglob("*.log")))
        pytest.fail(f"torchrun exited {run.returncode}\n--- stdout\n{run.stdout}\n--- stderr\n"
                    f"{run.stderr}\n{ranks}", pytrace=False)
    return run
