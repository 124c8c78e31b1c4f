"""`kdaudit benchmark`: suites, the offline plan, resuming a killed suite, paired tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from kdaudit import across_seeds, benchmark
from kdaudit.cli import main
from kdaudit.config import ConfigError


def test_every_shipped_suite_loads_and_checks_its_runs():
    names = benchmark.suites()
    assert {"smoke", "tiny", "tiny-full", "paper-gpt2", "paper-opt", "paper-llama"} <= set(names)
    for name in names:
        suite = benchmark.load_suite(name)
        assert suite.seeds and suite.variants


def test_paper_gpt2_dry_run_prints_the_plan_without_doing_anything(tmp_path, capsys):
    assert main(["benchmark", "paper-gpt2", "--dry-run", "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    for expected in ("gpt2-xl", "variant gpt2-medium", "variant gpt2-large",
                     "databricks/databricks-dolly-15k", "max_new_tokens 256",
                     "teacher (sft)             5500      4       5  5e-05    6875",
                     "minillm", "GiB", "not started"):
        assert expected in out, expected
    assert not (tmp_path / "b").exists()


def test_only_a_stage_beyond_one_gpu_sends_the_user_to_the_fsdp_config(tmp_path, capsys):
    """paper-llama fine-tunes every weight of OpenLLaMA 7B and 3B (kdaudit has no LoRA): its
    teacher and four of its students do not fit one 80 GB GPU; every stage of paper-gpt2
    does."""
    assert main(["benchmark", "paper-llama", "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "beyond one 80 GB GPU (74.5 GiB): teacher (sft), seqkd, imitkd, gkd, distillm;" in out
    assert "fsdp_gpus.yaml" in out
    assert main(["benchmark", "paper-gpt2", "--dry-run", "--out", str(tmp_path)]) == 0
    assert "fsdp_gpus.yaml" not in capsys.readouterr().out


def test_the_shipped_launch_configs_are_accelerate_configs():
    """Each file in benchmarks/accelerate loads with Accelerate's own reader (which refuses
    unknown keys), and the FSDP one shards with FSDP2 by the models' own layers."""
    from accelerate.commands.config.config_args import load_config_from_file

    folder = Path(benchmark.__file__).parent.parent / "benchmarks" / "accelerate"
    loaded = {p.name: load_config_from_file(str(p)) for p in folder.glob("*.yaml")}
    assert {"cpu_2proc.yaml", "gpus_ddp.yaml", "fsdp_gpus.yaml"} <= set(loaded)
    fsdp = loaded["fsdp_gpus.yaml"]
    assert str(fsdp.distributed_type).endswith("FSDP") and not fsdp.use_cpu
    assert fsdp.fsdp_config["fsdp_version"] == 2
    assert fsdp.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in fsdp.fsdp_config   # the model's own
    assert str(loaded["cpu_2proc.yaml"].distributed_type).endswith("MULTI_CPU")
    assert str(loaded["gpus_ddp.yaml"].distributed_type).endswith("MULTI_GPU")


def test_suite_errors_name_the_file_and_the_variant(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[benchmark]\nseeds = []\n')
    with pytest.raises(ConfigError, match=r"bad.toml: benchmark.seeds: expected a non-empty"):
        benchmark.load_suite(bad)
    bad.write_text('[benchmark]\npreset = "smoke"\n[benchmark.variants.v1]\n'
                   'student = { lrr = 1 }\n')
    with pytest.raises(ConfigError, match=r"bad.toml \(variant 'v1'\).*unknown field 'lrr'"):
        benchmark.load_suite(bad)
    bad.write_text('name = "x"\n')
    with pytest.raises(ConfigError, match="no \\[benchmark\\] table"):
        benchmark.load_suite(bad)
    with pytest.raises(SystemExit):
        main(["benchmark", "smoke", "--seeds", "0,x"])


def test_auc_by_ranks_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = rng.integers(0, 5, 300).astype(float) + 0.3 * y
    assert across_seeds.auc(y, s) == pytest.approx(roc_auc_score(y, s))


def _fake_run(cfg, strength: dict[str, float], n: int = 400):
    """A finished run's tables and scores: `nokd` at chance, each model of `strength`
    shifted by that much on members (seeded by the run's seed)."""
    rng = np.random.default_rng(cfg.seed)
    labels = np.repeat([1, 0], n // 2)
    ids = [f"r{i}" for i in range(n)]
    (cfg.run_dir / "scores").mkdir(parents=True, exist_ok=True)
    (cfg.run_dir / "tables").mkdir(parents=True, exist_ok=True)
    rows = []
    for model, shift in {"nokd": 0.0, **strength}.items():
        loss = rng.normal(size=n) + shift * labels
        category = np.where(np.arange(n) % 2, "qa", "brainstorming")
        pd.DataFrame({"record_id": ids, "label": labels, "category": category, "loss": loss}) \
            .to_parquet(cfg.run_dir / "scores" / f"{model}.parquet")
        rows.append({"model": model, "signal": "loss", "metric": "auc",
                     "value": roc_auc_score(labels, loss)})
    pd.DataFrame(rows).to_csv(cfg.run_dir / "tables" / "mia.csv", index=False)


def test_a_killed_suite_restarts_without_redoing_finished_runs(tmp_path):
    suite_file = tmp_path / "three.toml"
    suite_file.write_text('[benchmark]\npreset = "smoke"\nseeds = [0, 1, 2]\n')
    suite = benchmark.load_suite(suite_file)
    calls = []

    def runner(cfg, log):
        calls.append(cfg.seed)
        if cfg.seed == 1 and calls.count(1) == 1:
            raise KeyboardInterrupt          # killed in the middle of seed 1
        _fake_run(cfg, {"teacher": 2.5, "kd": 0.8, "twin": 0.0})

    with pytest.raises(KeyboardInterrupt):
        benchmark.run_suite(suite, tmp_path / "out", runner=runner, log=lambda _: None)
    assert calls == [0, 1]
    logs: list[str] = []
    paths = benchmark.run_suite(suite, tmp_path / "out", runner=runner, log=logs.append)
    assert calls == [0, 1, 1, 2]                          # seed 0 is not redone
    assert any("seed 0: finished, skipped" in line for line in logs)
    benchmark.run_suite(suite, tmp_path / "out", runner=runner, log=lambda _: None)
    assert calls == [0, 1, 1, 2]                          # a finished suite runs nothing
    root = tmp_path / "out" / "three" / "main"
    tests = pd.read_csv(root / "tables" / "paired_tests.csv")
    verdicts = dict(zip(tests["model"], tests["verdict"]))
    assert verdicts == {"kd": "leaks more than nokd", "twin": "no significant difference"}
    assert "teacher" not in verdicts
    kd = tests[tests["model"] == "kd"].iloc[0]
    assert kd["seeds"] == 3 and kd["ci_low"] < kd["delta"] < kd["ci_high"]
    spread = pd.read_csv(root / "tables" / "metrics.csv")
    spread = spread[spread["metric"] == "auc"]
    assert set(spread["seeds"]) == {3}
    summary = paths["main"].read_text()
    assert "The student that leaks most is **kd**" in summary
    ratios = pd.read_csv(root / "tables" / "teacher_to_student.csv")
    kd_ratio = ratios.set_index("model").loc["kd", "ratio"]
    means = spread[spread["signal"] == "loss"].set_index("model")["mean"]
    assert kd_ratio == pytest.approx((means["kd"] - 0.5) / (means["teacher"] - 0.5))
    assert 0.1 < kd_ratio < 0.9
    categories = pd.read_csv(root / "tables" / "auc_by_category.csv")
    assert set(categories["category"]) == {"qa", "brainstorming"}
    assert "| brainstorming |" in summary
    assert "![AUC heatmap](figures/heatmap_auc.png)" in summary
    assert (root / "figures" / "heatmap_auc.png").stat().st_size > 1000
    runs = pd.read_csv(root / "tables" / "runs.csv")
    assert list(runs["seed"]) == [0, 1, 2] and (runs["peak_rss_mib"] > 0).all()


def test_paired_test_of_a_model_against_itself_is_exactly_zero():
    rng = np.random.default_rng(1)
    y = np.repeat([1, 0], 50)
    s = rng.normal(size=100)
    t = across_seeds.paired_auc_test([(y, s, s), (y, s, s)], n_bootstrap=50)
    assert (t["delta"], t["ci_low"], t["ci_high"]) == (0.0, 0.0, 0.0)
    assert across_seeds.verdict(t) == "no significant difference"
