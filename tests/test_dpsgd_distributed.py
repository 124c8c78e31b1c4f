"""DP-SGD under a launcher: two processes share one DP model through Opacus's DPDDP."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from launcher import torchrun

pytestmark = pytest.mark.slow


def test_two_processes_train_one_dp_model(tmp_path):
    worker = Path(__file__).with_name("dp_ddp_worker.py")
    run = torchrun([str(worker), str(tmp_path / "m")], tmp_path / "logs")
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
