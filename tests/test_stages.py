"""The pure pieces of a run's stages, without running one: reference halves, which models a
run has, and what each training stage hashes."""
from __future__ import annotations

import dataclasses
import math

import pytest

from kdaudit.config import load_config
from kdaudit.pipeline import RunContext, roster, training_stages
from kdaudit.pipeline.prepare import reference_halves
from kdaudit.store import stable_hash


def test_reference_halves_come_in_complementary_pairs():
    pool = list(range(20))
    halves = reference_halves(pool, 4, seed=3)
    assert [len(h) for h in halves] == [10, 10, 10, 10]
    for a, b in (halves[0:2], halves[2:4]):
        assert sorted(a + b) == pool                  # complementary: each record once
    inside = [sum(x in h for h in halves) for x in pool]
    assert inside == [2] * 20                         # IN for half of the references
    assert halves[0] != halves[2]                     # the pairs are drawn independently
    assert reference_halves(pool, 4, seed=3) == halves
    assert reference_halves(pool, 4, seed=4) != halves


@pytest.fixture
def every_method(tmp_path):
    cfg = load_config("smoke", out_dir=str(tmp_path), reference_models=4,
                      methods=["nokd", "kd", "seqkd", "imitkd", "gkd", "minillm", "distillm",
                               "distildp", "dpsgd_student"],
                      dp={"epsilons": [2.0, math.inf]})
    return cfg


def stage_hashes(cfg) -> dict[str, str]:
    """Every training stage's input hash, as the run would compute it (nothing runs)."""
    # the upstream hashes the training stages read (data, bases), without running them
    run = RunContext(cfg, log=lambda _: None,
                     hashes={"data": "d", "base_teacher": "bt", "base_student": "bs"})
    stages = {}
    for build in training_stages(run):
        stage = build()
        stages[stage.name] = stable_hash(stage.inputs)
        run.hashes[stage.name] = stages[stage.name]
    return stages


def test_a_distillm_knob_retrains_only_distillm_and_its_reference_students(every_method):
    before = stage_hashes(every_method)
    kd = dataclasses.replace(every_method.kd, skew_alpha=0.3, loss_eps=0.2)
    after = stage_hashes(dataclasses.replace(every_method, kd=kd))
    changed = sorted(k for k in before if before[k] != after[k])
    assert changed == ["distillm", *(f"ref_distillm_{k}" for k in range(4))]
    assert {"teacher", "kd", "minillm", "ref_teacher_0", "ref_kd_1"} <= set(before)


def test_the_roster_carries_method_and_epsilon_as_fields(every_method):
    run = RunContext(every_method, log=lambda _: None)
    models = {m.id: m for m in roster.models(run)}
    dp = models["distildp@eps2"]
    assert (dp.method, dp.epsilon, dp.private, dp.role) == ("distildp", 2.0, True, "student")
    assert models["teacher_dp@eps2"].method == "teacher_dp"
    assert models["teacher_dp@eps2"].private and models["dpsgd_student@epsinf"].private
    assert math.isinf(models["dpsgd_student@epsinf"].epsilon)
    assert (models["kd"].method, models["kd"].private) == ("kd", False)
    assert models["nokd"].role == "baseline" and models["base_student"].role == "base"
    assert roster.student_order(["minillm", "kd"]) == ["nokd", "minillm", "kd"]
    assert roster.reference_ids(run)["distillm"] == [f"ref_distillm_{k}" for k in range(4)]
    assert "nokd" not in roster.reference_ids(run)    # no teacher: no reference students
