"""End to end on the smoke preset: a run killed mid-stage resumes, a finished run is skipped."""
from __future__ import annotations

import dataclasses
import json
import re

import pandas as pd
import pytest

from kdaudit.config import load_config
from kdaudit.pipeline import run_one
from kdaudit.train import loop

pytestmark = pytest.mark.slow


class Killed(RuntimeError):
    pass


@pytest.fixture(scope="module")
def interrupted_then_resumed(tmp_path_factory, monkeypatch_module):
    out = tmp_path_factory.mktemp("runs")
    cfg = load_config("smoke", out_dir=str(out), student={"checkpoint_every": 4})
    real_train = loop.train

    def train_killed_in_kd(job):
        def kill(step, record):
            if step == 6:
                raise Killed("simulated crash")
        extra = [kill] if job.desc.startswith("kd") else []
        return real_train(dataclasses.replace(job, callbacks=[*job.callbacks, *extra]))

    logs1: list[str] = []
    monkeypatch_module.setattr(loop, "train", train_killed_in_kd)
    with pytest.raises(Killed):
        run_one(cfg, log=logs1.append)
    manifest1 = json.loads((out / "smoke" / "manifest.json").read_text())
    monkeypatch_module.setattr(loop, "train", real_train)

    logs2: list[str] = []
    result = run_one(cfg, log=logs2.append)
    logs3: list[str] = []
    run_one(cfg, log=logs3.append)
    return cfg, out / "smoke", manifest1, logs2, logs3, result


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_killed_run_resumes_without_redoing_finished_stages(interrupted_then_resumed):
    _, run_dir, manifest1, logs2, _, _ = interrupted_then_resumed
    assert manifest1["stages"]["kd"]["status"] == "failed"
    assert "simulated crash" in manifest1["stages"]["kd"]["error"]
    finished_before = [k for k, v in manifest1["stages"].items() if v["status"] == "done"]
    assert {"data", "tokenizer", "base_teacher", "base_student", "teacher", "nokd"} <= set(
        finished_before)
    for stage in finished_before:
        assert f"[skip] {stage}: done, inputs unchanged" in logs2
    assert "[run ] kd" in logs2
    manifest2 = json.loads((run_dir / "manifest.json").read_text())
    assert manifest2["stages"]["kd"]["resumed_from"] == 4     # the last checkpoint
    assert manifest2["stages"]["kd"]["steps"] == manifest1["stages"]["nokd"]["steps"]
    for stage in finished_before:   # untouched: same start time as in the first run
        assert manifest2["stages"][stage]["started"] == manifest1["stages"][stage]["started"]


def test_second_identical_run_skips_every_stage(interrupted_then_resumed):
    *_, logs3, _ = interrupted_then_resumed
    assert logs3 and all(line.startswith("[skip]") for line in logs3)


def test_a_knob_of_a_method_not_in_the_run_retrains_nothing(interrupted_then_resumed):
    """A stage hashes only the KD fields its method reads: DistiLLM's and GKD's knobs leave
    the kd student (and everything else) of this run untouched (kd's own knobs do move its
    inputs: tests/test_kd_methods.py)."""
    import dataclasses

    cfg, *_ = interrupted_then_resumed
    other = dataclasses.replace(cfg, kd=dataclasses.replace(cfg.kd, skew_alpha=0.3,
                                                            loss_eps=0.2, jsd_beta=0.5))
    logs: list[str] = []
    run_one(other, log=logs.append)
    assert logs and all(line.startswith("[skip]") for line in logs)


def test_recomputed_stage_reruns_what_depends_on_it(interrupted_then_resumed):
    cfg, run_dir, *_ = interrupted_then_resumed
    (run_dir / "private" / "kd.generations.parquet").unlink()
    logs: list[str] = []
    run_one(cfg, log=logs.append)
    ran = [line[7:] for line in logs if line.startswith("[run ]")]
    assert ran == ["audit:kd", "audit", "report"]


def test_run_directory_and_report(interrupted_then_resumed):
    cfg, run_dir, *_, result = interrupted_then_resumed
    for split in ("members", "nonmembers", "public", "validation"):
        assert (run_dir / "data" / f"{split}.jsonl").exists()
    for model in ("teacher", "nokd", "kd", "base_teacher", "base_student"):
        assert (run_dir / "models" / model / "model.safetensors").exists()
        scores = pd.read_parquet(run_dir / "scores" / f"{model}.parquet")
        assert len(scores) == cfg.data.n_members + cfg.data.n_nonmembers
        assert scores.label.sum() == cfg.data.n_members
    assert not list((run_dir / "models").glob("*.ckpt"))
    mia = pd.read_csv(run_dir / "tables" / "mia.csv")
    auc = mia[mia.metric == "auc"].set_index(["model", "signal"]).value
    model_signals = [s for s in cfg.audit.signals if s != "blind"]
    for model in ("teacher", "nokd", "kd"):
        for signal in model_signals:
            assert 0.0 <= auc[(model, signal)] <= 1.0
    assert 0.4 < auc[("data", "blind")] < 0.6      # one random split: no shift to detect
    assert ("base_teacher", "ref_base") not in auc.index       # a base has no base
    memo = pd.read_csv(run_dir / "tables" / "memorization.csv")
    assert set(memo.model) == {"teacher", "nokd", "kd"}
    html = (run_dir / "report" / "report.html").read_text()
    md = (run_dir / "report" / "report.md").read_text()
    assert "data:image/png;base64" in html and "teacher" in md
    # the teacher fine-tuned on members leaks more than the student that never saw them
    assert auc[("teacher", "loss")] > auc[("nokd", "loss")]
    assert result.audit.summary().shape == (5, len(model_signals))
    privacy = pd.read_csv(run_dir / "tables" / "privacy.csv").set_index(["model", "metric"])
    assert {"exposure_mean", "epsilon_lower_bound_one_run", "epsilon_estimate_heuristic"} <= set(
        privacy.loc["teacher"].index)
    # the nokd student never saw a canary: its one-run bound is consistent with 0
    assert privacy.loc[("nokd", "epsilon_lower_bound_one_run"), "value"] == 0.0
    canaries = [json.loads(x) for x in (run_dir / "data" / "canaries.jsonl").read_text().split("\n")
                if x]
    public = (run_dir / "data" / "public.jsonl").read_text()
    assert canaries and not any(c["record"]["id"] in public for c in canaries)
    assert "Empirical privacy" in md
    assert set(result.audit.split_check) == {"blind"}


def test_the_run_caches_exactly_what_auditing_a_model_returns(interrupted_then_resumed):
    """The run audits each model with `kdaudit.audit.audit_model`, the function
    `audit_models` calls, and only caches its result: what the cache gives back equals a
    fresh call on the same model, array for array and row for row."""
    from kdaudit.audit import audit_model
    from kdaudit.models import load_model
    from kdaudit.pipeline import RunContext
    from kdaudit.pipeline.scoring import audit_context, load_audit

    cfg, run_dir, *_ = interrupted_then_resumed
    run = RunContext(cfg, log=lambda _: None)
    fresh = audit_model(audit_context(run), "kd", load_model(run_dir / "models" / "kd"),
                        trained=True, folder=run_dir / "models" / "kd")
    cached = load_audit(run, "kd")
    for name, value in fresh.scored.stats.__dict__.items():
        assert (getattr(cached.scored.stats, name) == value).all(), name
    assert (cached.scored.lowercase.logprob == fresh.scored.lowercase.logprob).all()
    assert cached.generations == fresh.generations
    pd.testing.assert_frame_equal(cached.extraction.reset_index(drop=True),
                                  fresh.extraction.reset_index(drop=True))
    assert cached.responses == fresh.responses
    columns = ["model", "metric", "value", "note"]
    pd.testing.assert_frame_equal(pd.DataFrame(cached.privacy)[columns],
                                  pd.DataFrame(fresh.privacy)[columns])


def test_report_command_rewrites_report_with_and_without_redaction(interrupted_then_resumed):
    from kdaudit.cli import main

    _, run_dir, *_, result = interrupted_then_resumed
    assert main(["report", str(run_dir)]) == 0
    redacted = (run_dir / "report" / "report.md").read_text()
    assert "Redaction is on" in redacted
    risky = result.audit.riskiest
    assert set(risky.model) == {"teacher", "nokd", "kd", "base_teacher", "base_student"}
    assert (risky.groupby("model").size() == 10).all()
    assert "### teacher (by " in redacted
    secrets = {s for ss in risky.secrets for s in ss if len(s) > 3}
    assert not any(s in redacted for s in secrets)
    assert main(["report", str(run_dir), "--show-secrets"]) == 0
    shown = (run_dir / "report-with-secrets" / "report.md").read_text()
    assert "[REDACTED]" in redacted and "[REDACTED]" not in shown
    assert (run_dir / "report" / "report.md").read_text() == redacted   # not overwritten
    assert main(["report", str(run_dir / "nope")]) == 2


def test_audit_command_on_run_checkpoints_reproduces_its_tables(interrupted_then_resumed,
                                                                 tmp_path):
    from kdaudit.cli import main

    cfg, run_dir, *_ = interrupted_then_resumed
    m, d = run_dir / "models", run_dir / "data"
    code = main(["audit", "--teacher", str(m / "teacher"), "--student", f"kd={m / 'kd'}",
                 "--student", f"nokd={m / 'nokd'}", "--teacher-base", str(m / "base_teacher"),
                 "--student-base", str(m / "base_student"), "--members", str(d / "members.jsonl"),
                 "--nonmembers", str(d / "nonmembers.jsonl"), "--canaries",
                 str(d / "canaries.jsonl"),
                 "--max-length", str(cfg.data.max_length), "--out", str(tmp_path)])
    assert code == 0
    trained = ["teacher", "kd", "nokd"]
    ours = pd.read_csv(tmp_path / "tables" / "mia.csv").query("model in @trained")
    theirs = pd.read_csv(run_dir / "tables" / "mia.csv").query("model in @trained")
    keys = ["model", "signal", "metric"]
    merged = ours.merge(theirs, on=keys, suffixes=("_audit", "_run"))
    assert len(merged) == len(theirs) == 3 * (len(cfg.audit.signals) - 1) * 3
    assert (merged.value_audit - merged.value_run).abs().max() < 1e-6
    # both students share one base: it is scored once and listed once
    assert sorted(set(pd.read_csv(tmp_path / "tables" / "utility.csv").model)) == [
        "base:kd", "base:teacher", "kd", "nokd", "teacher"]
    assert (tmp_path / "report" / "report.html").exists()
    ours = pd.read_csv(tmp_path / "tables" / "privacy.csv").set_index(["model", "metric"])
    theirs = pd.read_csv(run_dir / "tables" / "privacy.csv").set_index(["model", "metric"])
    pd.testing.assert_series_equal(ours.value.sort_index(), theirs.value.sort_index(),
                                   rtol=1e-6)
    audit_md = (tmp_path / "report" / "report.md").read_text()
    run_md = (run_dir / "report" / "report.md").read_text()
    heads = lambda text: [line for line in text.splitlines() if line.startswith("## ")]
    assert heads(audit_md) == heads(run_md)                       # same report sections
    assert main(["audit", "--student", "kd", "--members", "x", "--nonmembers", "y"]) == 2


def test_reference_models_enable_lira_and_rmia(tmp_path):
    cfg = load_config("smoke", out_dir=str(tmp_path), reference_models=4, methods=["nokd", "kd"],
                      data={"canaries_repeated": 0, "canaries_once": 0},
                      audit={"signals": ["loss", "lira", "lira_offline", "rmia"]})
    result = run_one(cfg, log=lambda _: None)
    run_dir = tmp_path / "smoke"
    half = [json.loads(x)["id"] for x in (run_dir / "data" / "reference_0.jsonl").read_text()
            .splitlines()]
    other = [json.loads(x)["id"] for x in (run_dir / "data" / "reference_1.jsonl").read_text()
             .splitlines()]
    assert len(half) == (cfg.data.n_members + cfg.data.n_nonmembers) // 2
    assert not set(half) & set(other)                  # complementary: each record IN once
    assert len(half) + len(other) == cfg.data.n_members + cfg.data.n_nonmembers
    for model in ("ref_teacher_0", "ref_teacher_3", "ref_kd_0", "ref_kd_3"):
        assert (run_dir / "models" / model / "model.safetensors").exists()
    auc = result.audit.mia.query("metric == 'auc'").set_index(["model", "signal"]).value
    for model in ("teacher", "kd"):
        for signal in ("lira", "lira_offline", "rmia"):
            assert 0.0 <= auc[(model, signal)] <= 1.0
    reasons = result.audit.signals.set_index("signal").not_run_for
    assert "nokd (needs reference models" in reasons["lira"]
    assert ("nokd", "lira") not in auc.index
    for signal in ("lira", "rmia"):     # every record had IN and OUT references
        assert set(re.findall(r"(\S+) \(", reasons[signal])) == {"nokd", "base_teacher",
                                                                 "base_student"}


KD_METHODS = ["kd", "seqkd", "imitkd", "gkd", "minillm", "distillm"]


def test_opt_and_llama_families_run_every_method(tmp_path):
    cfg = load_config("smoke", out_dir=str(tmp_path), families=["opt", "llama"],
                      methods=["nokd", *KD_METHODS],
                      models={"teacher": "{family}-smoke-teacher",
                              "student": "{family}-smoke-student", "external": "builtin"},
                      kd={"max_new_tokens": 16, "eval_every": 4, "minillm_rollouts": 32},
                      data={"canaries_repeated": 0, "canaries_once": 0, "n_members": 100,
                            "n_nonmembers": 100, "n_public": 128},
                      audit={"signals": ["loss", "mink", "ref_base", "ref_ext", "blind"],
                             "memorization_records": 20, "utility_records": 50,
                             "n_bootstrap": 50})
    from kdaudit.pipeline import run

    suite = run(cfg, log=lambda _: None)
    assert set(suite.families) == {"opt", "llama"}
    for family, result in suite.families.items():
        run_dir = tmp_path / "smoke" / family
        config = json.loads((run_dir / "models" / "teacher" / "config.json").read_text())
        assert config["model_type"] == family
        auc = result.audit.mia.query("metric == 'auc'").set_index(["model", "signal"]).value
        for model in ("teacher", "nokd", *KD_METHODS):
            for signal in ("loss", "mink", "ref_ext"):
                assert 0.0 <= auc[(model, signal)] <= 1.0
        for method in KD_METHODS:     # every objective went down over training
            log = [r for r in map(json.loads, (run_dir / "models" / method / "train_log.jsonl")
                                  .read_text().splitlines()) if "objective" in r]
            assert log[-1]["objective"] < log[0]["objective"], (family, method)
        assert (run_dir / "report" / "report.html").exists()
    html = suite.report["html"].read_text()
    for family in ("opt", "llama"):
        assert f"../{family}/report/report.html" in html


@pytest.fixture(scope="module")
def dp_run(interrupted_then_resumed):
    """The smoke run with two DP students added: its finished stages are reused."""
    smoke, *_ = interrupted_then_resumed
    cfg = load_config("smoke", out_dir=smoke.out_dir, student={"checkpoint_every": 4},
                      methods=["nokd", "kd", "dpsgd_student", "dpkd"],
                      dp={"epsilons": [2.0, float("inf")]},
                      dp_train={"epochs": 1.0, "batch_size": 32, "lr": 3e-3})
    logs: list[str] = []
    return cfg, run_one(cfg, log=logs.append), logs


def test_dp_students_are_trained_accounted_and_audited(dp_run):
    cfg, result, logs = dp_run
    run_dir = result.run_dir
    assert "[skip] teacher: done, inputs unchanged" in logs and "[run ] dpkd@eps2" in logs
    expected = {"dpsgd_student@eps2", "dpkd@eps2", "teacher_dpkd@eps1", "dpsgd_student@epsinf",
                "dpkd@epsinf", "teacher_dpkd@epsinf"}
    assert expected <= set(result.audit.models.model)
    assert expected <= set(result.audit.mia.model)
    privacy = pd.read_csv(run_dir / "tables" / "privacy.csv")
    accounted = privacy[privacy.metric == "epsilon_accounted"].set_index("model").value
    assert set(accounted.index) == {"dpsgd_student@eps2", "dpkd@eps2", "teacher_dpkd@eps1"}
    assert accounted["dpsgd_student@eps2"] == pytest.approx(2.0, rel=1e-3)
    assert accounted["teacher_dpkd@eps1"] == pytest.approx(1.0, rel=1e-3)
    assert accounted["dpkd@eps2"] == pytest.approx(2.0, rel=2e-3)     # ε/2 + ε/2
    bounds = privacy[privacy.metric == "epsilon_lower_bound_one_run"].set_index("model").value
    for model, eps in accounted.items():   # the canaries never beat the accounting
        assert bounds[model] <= eps
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["dpkd@eps2"]["privacy"]["epsilon"] == accounted["dpkd@eps2"]
    html = (run_dir / "report" / "report.html").read_text()
    assert "Privacy–utility frontier" in html and "dpkd@eps2" in html


def test_nothing_un_noised_leaves_a_dp_model(dp_run):
    """The per-step losses of DP-SGD runs (on private batches, without noise) are only in
    private/; no file of the DP model's folder, the manifest, the tables or the report holds
    one; the white-box bound of each DP-SGD run is in the privacy table."""
    _, result, _ = dp_run
    run_dir = result.run_dir
    dp_models = ("dpsgd_student@eps2", "dpkd@eps2", "teacher_dpkd@eps1")
    losses = set()
    for m in dp_models:
        log = [json.loads(x) for x in (run_dir / "private" / f"{m}.train_log.jsonl")
               .read_text().splitlines()]
        losses |= {repr(r["loss"]) for r in log}   # as any table or JSON would write it
        assert not (run_dir / "models" / m / "train_log.jsonl").exists()
        stage = json.loads((run_dir / "manifest.json").read_text())["stages"][m]
        assert "first_loss" not in stage and "last_loss" not in stage
    published = [*(f for m in dp_models for f in (run_dir / "models" / m).rglob("*")),
                 run_dir / "manifest.json", *(run_dir / "tables").glob("*.csv"),
                 *(run_dir / "report").rglob("*")]
    for f in published:
        if f.is_file() and f.suffix != ".png":
            text = f.read_bytes().decode("utf-8", "replace")
            found = [x for x in losses if x in text]
            assert not found, (f, found[:3])
    training = pd.read_csv(run_dir / "tables" / "training.csv")
    assert not set(dp_models) & set(training.model)
    privacy = pd.read_csv(run_dir / "tables" / "privacy.csv")
    white = privacy[privacy.metric == "epsilon_lower_bound_white_box"]
    assert set(dp_models) <= set(white.model)
    accounted = privacy[privacy.metric == "epsilon_accounted"].set_index("model").value
    for row in white.itertuples():
        assert 0 <= row.value <= accounted[row.model]
