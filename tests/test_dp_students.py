"""The DP students (docs/methods.md §7): their losses, budgets and accounting, and each one end to end."""
from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from kdaudit.config import KDConfig, TrainConfig
from kdaudit.data.corpus import generate_records
from kdaudit.data.records import write_jsonl
from kdaudit.data.template import encode_record, format_text
from kdaudit.distil import train_private_student
from kdaudit.dp import students as dps
from kdaudit.models import build_zoo_model, load_model, train_tokenizer
from kdaudit.train import loop
from kdaudit.train.loop import private_log_path
from kdaudit.train.batching import collate
from kdaudit.train.methods import DP_METHODS, METHODS, method_params

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    tok = train_tokenizer([format_text(r) for r in generate_records(200, seed=41)], 1000)
    records = generate_records(40, seed=42)
    return tok, records, [encode_record(r, tok, 64) for r in records]


def _save(model, tok, path):
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    return path


# -- losses ------------------------------------------------------------------------------------
def test_per_sequence_losses_average_each_sequence_first(setup):
    tok, records, _ = setup
    examples = [encode_record(r, tok, 400) for r in records[:5]]   # response lengths differ
    assert len({len(e.input_ids) - e.response_start for e in examples}) > 1
    batch = collate(examples[:5], tok.pad_token_id)
    torch.manual_seed(0)
    s, t = torch.randn(2, *batch.input_ids.shape, len(tok))
    params = dataclasses.replace(method_params(METHODS["dpkd"], KDConfig(kd_ratio=0.5)),
                                 per_sequence=True)
    loss, _ = METHODS["dpkd"].loss(s, t, batch, params)
    # right padding: a row alone has the same logits at its real positions
    rows = [METHODS["dpkd"].loss(s[i:i + 1, :len(examples[i].input_ids)],
                                 t[i:i + 1, :len(examples[i].input_ids)],
                                 collate(examples[i:i + 1], tok.pad_token_id), params)[0]
            for i in range(5)]
    assert loss.item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-5)
    token_mean, _ = METHODS["dpkd"].loss(s, t, batch,
                                         dataclasses.replace(params, per_sequence=False))
    assert token_mean.item() != pytest.approx(loss.item(), rel=1e-4)   # lengths differ
    assert {"sft", "nokd", "kd", "dpsgd_student", "dpkd"} <= set(DP_METHODS)
    assert not {"seqkd", "gkd", "distildp"} & set(DP_METHODS)
    assert DP_METHODS == ("pretrain", "sft", "nokd", "kd", "synthetic_only", "dpsgd_student",
                          "dpkd")


def test_distildp_loss_mixes_hard_and_soft_labels(setup):
    tok, _, examples = setup
    batch = collate(examples[:4], tok.pad_token_id)
    torch.manual_seed(1)
    s, t = torch.randn(2, *batch.input_ids.shape, len(tok))
    params = method_params(METHODS["distildp"], KDConfig())
    ce, _ = METHODS["nokd"].loss(s, None, batch, params)
    kd, _ = METHODS["kd"].loss(s, t, batch, dataclasses.replace(params, kd_ratio=1.0))
    for w in (0.0, 0.4, 1.0):
        got, parts = METHODS["distildp"].loss(s, t, batch,
                                              dataclasses.replace(params, soft_label_weight=w))
        assert got.item() == pytest.approx((1 - w) * ce.item() + w * kd.item(), rel=1e-5)
    assert "hidden_mse" not in parts


def test_hidden_alignment_trains_a_projection_and_saves_the_student_alone(setup, tmp_path):
    tok, _, examples = setup
    student = build_zoo_model("gpt2-smoke-student", tok, seed=0)     # width 32
    teacher = build_zoo_model("gpt2-smoke-teacher", tok, seed=1)     # width 64
    assert student.config.hidden_size != teacher.config.hidden_size
    cfg = TrainConfig(epochs=3, batch_size=8, lr=5e-3, log_every=1, checkpoint_every=0)
    loop.train(loop.TrainJob(
        student, examples, METHODS["distildp"], cfg, out_dir=tmp_path / "s", seed=0,
        pad_id=tok.pad_token_id, tokenizer=tok, teacher=teacher, desc=None,
        params=method_params(METHODS["distildp"], KDConfig(hidden_weight=1.0))))
    log = [json.loads(x) for x in (tmp_path / "s" / "train_log.jsonl").read_text().splitlines()]
    mse = [r["hidden_mse"] for r in log]
    assert mse[-1] < 0.7 * mse[0]
    saved = load_file(tmp_path / "s" / "model.safetensors")
    assert not [k for k in saved if "projection" in k]
    load_model(tmp_path / "s")


# -- budgets and accounting ------------------------------------------------------------------
def test_budgets_and_model_ids():
    assert dps.model_id("distildp", 2.0) == "distildp@eps2"
    assert dps.model_id("dpkd", math.inf) == "dpkd@epsinf"
    assert dps.teacher_id("distildp", 2.0) == dps.teacher_id("synthetic_only", 2.0) == \
        "teacher_dp@eps2"
    assert dps.teacher_id("dpkd", 2.0) == "teacher_dpkd@eps1"
    assert dps.teacher_id("dpsgd_student", 2.0) is None
    assert dps.split_budget("dpkd", 4.0) == {"teacher": 2.0, "student": 2.0}
    assert dps.dp_config(math.inf, None, 1.0) is None
    assert set(dps.PRIVATE_METHODS) == {"distildp", "synthetic_only", "dpsgd_student", "dpkd"}


def test_student_privacy_composes_what_each_run_spent():
    t, s = {"epsilon": 0.99, "delta": 5e-4}, {"epsilon": 1.0, "delta": 5e-4}
    dpkd = dps.student_privacy("dpkd", 2.0, t, s)
    assert dpkd["epsilon"] == pytest.approx(1.99) and dpkd["delta"] == pytest.approx(1e-3)
    assert "composition" in dpkd["composition"]
    assert dps.student_privacy("distildp", 2.0, t, None)["epsilon"] == 0.99
    assert "post-processing" in dps.student_privacy("synthetic_only", 2.0, t, None)["composition"]
    assert dps.student_privacy("dpsgd_student", 2.0, None, s)["epsilon"] == 1.0
    assert dps.student_privacy("dpkd", math.inf, None, None) is None


# -- end to end --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def writer(setup, tmp_path_factory):
    """A smoke-sized base that writes records: it has memorised four behind their codes."""
    tok, records, _ = setup
    model = build_zoo_model("gpt2-smoke-teacher", tok, seed=0)
    out = tmp_path_factory.mktemp("writer") / "base"
    examples = dps.teacher_examples(records[:4], tok, 256, control_codes=True)
    loop.train(loop.TrainJob(
        model, examples, METHODS["sft"],
        TrainConfig(epochs=60, batch_size=4, lr=1e-2, checkpoint_every=0),
        out_dir=out, seed=0, pad_id=tok.pad_token_id, tokenizer=tok, desc=None))
    return out


def test_distildp_end_to_end(setup, writer, tmp_path):
    tok, records, _ = setup
    student_base = _save(build_zoo_model("gpt2-smoke-student", tok, seed=2), tok,
                         tmp_path / "student_base")
    result = train_private_student(
        "distildp", student_base=student_base, teacher_base=writer, data=records[:4],
        out=tmp_path / "distildp", epsilon=8.0, synthetic_records=8, synthetic_tokens=256,
        max_length=256, dp_train=TrainConfig(epochs=1, batch_size=4, lr=1e-5),
        train=TrainConfig(epochs=1, batch_size=8, checkpoint_every=0),
        categories=sorted({r.category for r in records}))
    teacher_spent = json.loads((tmp_path / "distildp-teacher" / "privacy.json").read_text())
    assert teacher_spent["epsilon"] == pytest.approx(8.0, rel=1e-3)
    spent = json.loads((tmp_path / "distildp" / "privacy.json").read_text())
    assert spent["epsilon"] == teacher_spent["epsilon"] == result.privacy["epsilon"]
    synthetic = (tmp_path / "distildp-synthetic.jsonl").read_text().splitlines()
    assert 0 < len(synthetic) <= 8
    assert all(json.loads(x)["id"].startswith("syn-") for x in synthetic)
    log = [json.loads(x) for x in (tmp_path / "distildp" / "train_log.jsonl").read_text().splitlines()]
    assert "forward_kl" in log[0] and "ce" in log[0]   # soft and hard labels
    load_model(tmp_path / "distildp")


@pytest.mark.parametrize("method", ["dpsgd_student", "dpkd"])
def test_dp_sgd_students_spend_their_budget(setup, writer, tmp_path, method):
    tok, records, _ = setup
    student_base = _save(build_zoo_model("gpt2-smoke-student", tok, seed=2), tok,
                         tmp_path / "student_base")
    result = train_private_student(
        method, student_base=student_base, data=records, out=tmp_path / method, epsilon=4.0,
        teacher_base=writer if method == "dpkd" else None, max_length=64,
        dp_train=TrainConfig(epochs=1, batch_size=10, lr=1e-3))
    assert result.privacy["epsilon"] == pytest.approx(4.0, rel=2e-3)
    if method == "dpkd":
        parts = result.privacy["components"]
        assert parts["teacher"]["epsilon"] == pytest.approx(2.0, rel=1e-3)
        assert parts["student"]["epsilon"] == pytest.approx(2.0, rel=1e-3)
        assert result.privacy["delta"] == pytest.approx(1 / 400)   # δ = 1/(10 N) in all
        assert parts["student"]["unit"] == "person" and parts["student"]["units"] == 40
        assert not (tmp_path / method / "train_log.jsonl").exists()   # private: beside it
        log = private_log_path(tmp_path / method).read_text()
        assert "forward_kl" in log
    else:
        assert result.privacy["delta"] == pytest.approx(1 / 400)


def test_cli_runs_a_dp_student_and_says_what_is_missing(setup, tmp_path, capsys):
    from kdaudit.cli import main

    tok, records, _ = setup
    base = _save(build_zoo_model("gpt2-smoke-student", tok, seed=2), tok, tmp_path / "base")
    write_jsonl(records, tmp_path / "members.jsonl")
    args = ["student", "--method", "dpsgd_student", "--student-base", str(base), "--data",
            str(tmp_path / "members.jsonl"), "--out", str(tmp_path / "s"), "--preset", "smoke",
            "--epochs", "1", "--batch-size", "10", "--max-length", "64"]
    assert main(args) == 2
    assert "--epsilon" in capsys.readouterr().err
    assert main([*args, "--epsilon", "3"]) == 0
    out = capsys.readouterr().out
    spent = re.search(r"privacy spent: epsilon ([0-9.]+) at delta", out)
    assert spent and float(spent.group(1)) == pytest.approx(3.0, rel=2e-3)
    assert main(["student", "--method", "dpkd", "--student-base", str(base), "--data",
                 str(tmp_path / "members.jsonl"), "--out", str(tmp_path / "k"),
                 "--epsilon", "2"]) == 2
    assert "--teacher-base" in capsys.readouterr().err


def test_an_audit_shows_what_a_dp_model_spent(setup, tmp_path):
    from kdaudit import audit_models
    from kdaudit.config import AuditConfig

    tok, records, _ = setup
    plain = _save(build_zoo_model("gpt2-smoke-student", tok, seed=2), tok, tmp_path / "plain")
    dp = _save(build_zoo_model("gpt2-smoke-student", tok, seed=3), tok, tmp_path / "dp")
    (dp / "privacy.json").write_text(json.dumps(
        dps.student_privacy("dpsgd_student", 2.0, None, {"epsilon": 1.998, "delta": 1e-4})))
    result = audit_models({"nokd": plain, "dpsgd_student@eps2": dp}, records[:10], records[10:20],
                          config=AuditConfig(signals=["loss"], n_bootstrap=20,
                                             memorization_records=4, utility_records=0),
                          max_length=64)
    rows = result.privacy[result.privacy.metric == "epsilon_accounted"]
    assert list(rows.model) == ["dpsgd_student@eps2"] and rows.value.iloc[0] == 1.998
    assert "DP-SGD of the student" in rows.note.iloc[0]
