"""DP-SGD under a launcher: two processes share one DP model through Opacus's DPDDP."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_two_processes_train_one_dp_model(tmp_path):
    worker = Path(__file__).with_name("dp_ddp_worker.py")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # --standalone: the rendezvous store takes a free port from the OS (never a fixed one);
    # --tee 3 and --log-dir keep every rank's stdout and stderr, printed whole on failure
    logs = tmp_path / "logs"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "--log-dir", str(logs), "--tee", "3",
                          str(worker), str(tmp_path / "m")],
                         capture_output=True, text=True, env=env, timeout=600)
    if run.returncode != 0:
        ranks = "\n".join(f"--- {p.relative_to(logs)}\n{p.read_text(errors='replace')}"
                          for p in sorted(logs.rglob("*.log")))
        pytest.fail(f"torchrun exited {run.returncode}\n--- stdout\n{run.stdout}\n--- stderr\n"
                    f"{run.stderr}\n{ranks}", pytrace=False)
    # --tee prefixes each line with its rank ("[default0]:RESULT {...}")
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in run.stdout.splitlines()
               if "RESULT " in line]
    assert sorted(r["rank"] for r in results) == [0, 1] and results[0]["world"] == 2
    assert results[0]["checksum"] == pytest.approx(results[1]["checksum"], rel=1e-12)
    # each rank draws its own Poisson batches from its half of the data
    assert results[0]["sizes"] != results[1]["sizes"]
    assert results[0]["steps"] == results[1]["steps"] == 6          # q = 8/48, one epoch
    assert results[0]["epsilon"] == pytest.approx(4.0, rel=1e-3)
    assert (tmp_path / "m" / "model.safetensors").exists()
