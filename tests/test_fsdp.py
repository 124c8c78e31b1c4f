"""`kdaudit run` with its training under FSDP2 on two CPU processes (tests/fsdp_on_cpu.py sets
up Accelerate's FSDP from benchmarks/accelerate/fsdp_gpus.yaml, as on GPUs).

Under FSDP every forward of the student gathers its sharded weights from both processes, so
this run checks what DDP does not need: on-policy sampling in step (GKD samples on half its
steps, each process from its own seed; without the lockstep the run hangs in gkd) and models
saved from the gathered weights (saved from a process's shards, the run hangs too). Training
is within the tolerance of the DDP test (tests/test_launch.py) of the one-process run:
measured on this config (2-core CPU), perplexities within 6% and AUCs within 0.05.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from small_smoke import CONFIG
from launcher import torchrun

pytestmark = pytest.mark.slow

SHIM = str(Path(__file__).with_name("fsdp_on_cpu.py"))
METHODS = 'methods = ["nokd", "kd", "gkd", "imitkd", "minillm", "distillm"]\n'


def _tables(run: Path, name: str, metric: str, index) -> pd.Series:
    t = pd.read_csv(run / "smoke" / "tables" / f"{name}.csv")
    return t.query(f"metric == '{metric}'").set_index(index)["value"]


def test_training_under_fsdp_lands_within_tolerance_of_one_process(tmp_path):
    (tmp_path / "run.toml").write_text(METHODS + CONFIG)
    args = ["run", "--preset", "smoke", "--config", str(tmp_path / "run.toml")]
    env = {"KDAUDIT_CACHE": str(tmp_path / "cache")}
    launched = torchrun([SHIM, *args, "--out", str(tmp_path / "fsdp")], tmp_path / "logs",
                        env=env, timeout=400)
    assert "[default0]:Report:" in launched.stdout, launched.stdout
    one = subprocess.run([sys.executable, "-m", "kdaudit", *args, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, **env, "HF_HUB_OFFLINE": "1"})
    assert one.returncode == 0, f"{one.stdout}\n{one.stderr}"

    runs = {o: tmp_path / o for o in ("one", "fsdp")}
    steps = {o: pd.read_csv(r / "smoke" / "tables" / "training.csv").groupby("model")["step"]
             .max().to_dict() for o, r in runs.items()}
    assert steps["fsdp"] == steps["one"] and "gkd" in steps["one"]
    ppl = {o: _tables(r, "utility", "perplexity", "model") for o, r in runs.items()}
    ratio = ppl["fsdp"] / ppl["one"]
    assert ratio.between(1 / 1.15, 1.15).all(), ratio.to_dict()
    auc = {o: _tables(r, "mia", "auc", ["model", "signal"]) for o, r in runs.items()}
    gap = (auc["fsdp"] - auc["one"]).abs()
    assert gap.max() <= 0.06, gap.sort_values().tail(3).to_dict()
