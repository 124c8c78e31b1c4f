"""Config presets and validation; atomic writes and the manifest."""
from __future__ import annotations

import json

import pytest

from kdaudit.config import ConfigError, TrainConfig, load_config, presets
from kdaudit.store import Manifest, atomic_write_text, stable_hash


def test_presets_load_and_override(tmp_path):
    assert {"smoke", "tiny"} <= set(presets())
    cfg = load_config("smoke", seed=3)
    assert cfg.name == "smoke" and cfg.seed == 3 and cfg.data.n_members == 200
    f = tmp_path / "c.toml"
    f.write_text('methods = ["kd"]\n[teacher]\nepochs = 2\n')
    cfg = load_config("smoke", f)
    assert cfg.methods == ["kd"] and cfg.teacher.epochs == 2.0


@pytest.mark.parametrize("text, match", [
    ("[teacher]\nlrr = 1\n", r"c\.toml\.teacher: unknown field 'lrr'"),
    ("[teacher]\nepochs = 'many'\n", r"teacher\.epochs: expected float"),
    ('methods = ["kd", "magic"]\n', r"unknown method\(s\) \['magic'\]"),
    ("[audit]\nsignals = ['loss', 'psychic']\n", r"unknown signal\(s\) \['psychic'\]"),
    ("[data\n", r"c\.toml: not valid TOML"),
    ("reference_models = 2\n", r"reference_models: expected 0 \(off\) or at least 4"),
])
def test_bad_config_names_file_and_field(tmp_path, text, match):
    f = tmp_path / "c.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config("smoke", f)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'nope'"):
        load_config("nope")


def test_the_demo_is_the_tiny_preset_on_half_its_records():
    demo, tiny = load_config("demo").to_dict(), load_config("tiny").to_dict()
    assert demo.pop("name") == "demo" and tiny.pop("name") == "tiny"
    halved = {"n_members", "n_nonmembers", "n_public", "canaries_once"}
    for f in halved:
        assert demo["data"].pop(f) * 2 == tiny["data"].pop(f), f
    assert demo["data"].pop("pool_size") < tiny["data"].pop("pool_size")
    assert demo == tiny          # the same models, recipe, signals and audit


def test_a_preset_extends_another(tmp_path, monkeypatch):
    import kdaudit.config as config

    monkeypatch.setattr(config, "PRESET_DIR", tmp_path)
    (tmp_path / "base.toml").write_text('methods = ["kd"]\n[teacher]\nepochs = 2\n')
    (tmp_path / "child.toml").write_text('extends = "base"\n[teacher]\nlr = 0.5\n')
    cfg = load_config("child")
    assert (cfg.name, cfg.methods, cfg.teacher.epochs, cfg.teacher.lr) == \
        ("child", ["kd"], 2.0, 0.5)
    (tmp_path / "base.toml").write_text('extends = "child"\n')
    with pytest.raises(ConfigError, match="cycle: child -> base -> child"):
        load_config("child")
    (tmp_path / "child.toml").write_text('extends = "gone"\n')
    with pytest.raises(ConfigError, match="unknown preset 'gone' \\(extended by preset 'child'\\)"):
        load_config("child")
    (tmp_path / "child.toml").write_text('[teacher]\nlrr = 1\nextends = "base"\n')
    with pytest.raises(ConfigError, match=r"child\.toml\.teacher: unknown field"):
        load_config("child")


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "x.txt"
    atomic_write_text(path, "old")
    import os

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_manifest_done_depends_on_input_hash(tmp_path):
    m = Manifest(tmp_path / "manifest.json")
    h = stable_hash({"a": 1, "b": [1, 2]})
    assert h == stable_hash({"b": [1, 2], "a": 1})
    m.mark("data", status="done", input_hash=h)
    again = Manifest(tmp_path / "manifest.json")
    assert again.is_done("data", h) and not again.is_done("data", stable_hash({"a": 2}))
    (tmp_path / "manifest.json").write_text("{broken")
    with pytest.raises(ValueError, match="manifest.json: manifest is not valid JSON"):
        Manifest(tmp_path / "manifest.json")


def test_families_name_models_by_placeholder(tmp_path):
    cfg = load_config("smoke", families=["opt", "llama"],
                      models={"teacher": "{family}-smoke-teacher",
                              "student": "{family}-smoke-student"})
    opt = cfg.for_family("opt")
    assert (opt.models.teacher, opt.models.student) == ("opt-smoke-teacher", "opt-smoke-student")
    assert opt.families == [] and opt.run_dir == cfg.run_dir / "opt"
    with pytest.raises(ConfigError, match=r"models.teacher: .*placeholder '\{family\}'"):
        load_config("smoke", families=["opt", "llama"])
    with pytest.raises(ConfigError, match="listed twice"):
        load_config("smoke", families=["opt", "opt"],
                    models={"teacher": "{family}-smoke-teacher",
                            "student": "{family}-smoke-student"})


def test_kd_hyperparameters_are_range_checked(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[kd]\njsd_beta = 1.0\n")
    with pytest.raises(ConfigError, match=r"kd.jsd_beta: expected 0 < β < 1"):
        load_config("smoke", bad)
    with pytest.raises(ConfigError, match="ref_ext' needs an independent model"):
        load_config("smoke", audit={"signals": ["loss", "ref_ext"]})
    for field, value, expected in (("recipe", "fast", "expected one of"),
                                   ("distillm_replay_schedule", "up", "expected .decreasing"),
                                   ("minillm_ppo_epochs", 0, "expected ≥ 1"),
                                   ("lm_coef", -1.0, "expected ≥ 0")):
        with pytest.raises(ConfigError, match=f"kd.{field}: {expected}"):
            load_config("smoke", kd={field: value})


def test_lm_corpus_reads_text_and_jsonl_files_and_names_a_bad_line(tmp_path):
    from kdaudit.data.lm_corpus import lm_texts

    txt = tmp_path / "c.txt"
    txt.write_text("one text\n\nanother\nthird\n")
    assert lm_texts(str(txt), 2, list) == ["one text", "another"]
    good = tmp_path / "c.jsonl"
    good.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert lm_texts(str(good), 10, list) == ["a", "b"]
    assert lm_texts("builtin", 10, lambda: ["x"]) == ["x"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"txt": "b"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: expected an object with a 'text'"):
        lm_texts(str(bad), 10, list)
    with pytest.raises(ConfigError, match="no such file"):
        lm_texts(str(tmp_path / "missing.txt"), 10, list)


def test_student_by_method_departs_for_one_method_and_names_bad_fields():
    cfg = load_config("smoke", student_by_method={"kd": {"lr": 5e-5, "batch_size": 4}})
    assert (cfg.student_train("kd").lr, cfg.student_train("kd").batch_size) == (5e-5, 4)
    assert cfg.student_train("nokd") == cfg.student
    with pytest.raises(ConfigError, match=r"student_by_method.kd: unknown field 'lrr'"):
        load_config("smoke", student_by_method={"kd": {"lrr": 1.0}})
    with pytest.raises(ConfigError, match=r"student_by_method.gkd: expected a table .* one "
                                          r"of the run's methods"):
        load_config("smoke", student_by_method={"gkd": {"lr": 1.0}})


def test_training_sections_are_range_checked_before_any_stage(tmp_path):
    for section, field, value, expected in (("teacher", "batch_size", 0, "≥ 1"),
                                            ("student", "epochs", 0, "> 0"),
                                            ("dp_train", "lr", -0.1, "> 0"),
                                            ("pretrain", "warmup_ratio", 1.0, "0 ≤ warmup")):
        with pytest.raises(ConfigError, match=f"{section}.{field}: expected {expected}"):
            load_config("smoke", **{section: {field: value}})
    from kdaudit.distil import StudentJob

    with pytest.raises(ConfigError, match=r"train.epochs: expected > 0 .*, got -1.0"):
        StudentJob("nokd", student_base="b", data="d", out=str(tmp_path),
                   train=TrainConfig(epochs=-1.0))


def test_a_cross_field_error_names_the_config_file(tmp_path):
    bad = tmp_path / "mine.toml"
    bad.write_text("[teacher]\nbatch_size = 0\n")
    with pytest.raises(ConfigError, match=r"mine.toml: teacher.batch_size: expected ≥ 1"):
        load_config("smoke", bad)


@pytest.mark.parametrize("audit, message", [
    ({"signals": []}, "audit.signals: expected at least one signal"),
    ({"n_bootstrap": 0}, "audit.n_bootstrap: expected ≥ 1, got 0"),
    ({"memorization_records": -1}, "audit.memorization_records: expected ≥ 0, got -1"),
    ({"canary_guess_fraction": 0.7}, r"audit.canary_guess_fraction: expected a number in "
                                     r"\(0, 0.5\], got 0.7"),
    ({"perturbation_sigma": float("nan")}, "audit.perturbation_sigma: expected a number in"),
])
def test_audit_settings_are_range_checked_before_any_stage(tmp_path, audit, message):
    """Before, these failed only at the audit stage, after every model had trained."""
    path = tmp_path / "run.toml"
    path.write_text("[audit]\n" + "\n".join(
        f"{k} = {'nan' if isinstance(v, float) and v != v else json.dumps(v)}"
        for k, v in audit.items()) + "\n")
    with pytest.raises(ConfigError, match=rf"{path}: {message}"):
        load_config("smoke", path)


def test_lengths_beyond_the_models_context_and_lira_without_references_are_refused(tmp_path,
                                                                                    capsys):
    from kdaudit.cli import main

    path = tmp_path / "run.toml"
    path.write_text("[data]\nmax_length = 100000\n")
    assert main(["run", "--preset", "smoke", "--config", str(path), "--out",
                 str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"kdaudit: error: {path}: data.max_length: 100000 tokens exceed the 256-token context "
        f"of models.teacher = 'gpt2-smoke-teacher'")
    assert not (tmp_path / "runs").exists()
    # a sampling method whose responses would fill the whole sequence (the prompt cut to one
    # token, the sequence past the model's positions) stops before the first stage
    path.write_text('methods = ["nokd", "imitkd"]\n[kd]\nmax_new_tokens = 128\n')
    assert main(["run", "--preset", "smoke", "--config", str(path), "--out",
                 str(tmp_path / "runs")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"kdaudit: error: {path}: kd.max_new_tokens: 128 sampled tokens leave no room for a "
        f"prompt within data.max_length = 128 (methods ['imitkd'] sample responses); expected "
        f"fewer than 128")
    assert not (tmp_path / "runs").exists()
    path.write_text('[audit]\nsignals = ["loss", "rmia"]\n')
    with pytest.raises(ConfigError, match=r"\['rmia'\] need reference models: set "
                                          r"reference_models to 4 or more"):
        load_config("smoke", path)


def test_dp_sgd_methods_are_refused_under_an_fsdp_launch(monkeypatch):
    from kdaudit.pipeline import check_launch

    cfg = load_config("smoke", methods=["nokd", "kd", "dpkd"])
    check_launch(cfg)                                   # not launched with FSDP: fine
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match=r"\['dpkd'\] train with DP-SGD.*not FSDP"):
        check_launch(cfg)
    check_launch(load_config("smoke", methods=["nokd", "kd", "gkd"]))
