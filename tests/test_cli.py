"""The command line: help texts and clear errors; the work itself is tested through the API."""
from __future__ import annotations

import pytest

from kdaudit.cli import build_parser, main


def test_help_explains_each_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "run" in out and "report" in out
    for command, phrase in (("run", "--preset"), ("report", "RUN_DIR")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert phrase in capsys.readouterr().out


def test_run_arguments_reach_the_config():
    args = build_parser().parse_args(["run", "--preset", "smoke", "--seed", "4", "--out", "x"])
    assert (args.preset, args.seed, args.out) == ("smoke", 4, "x")


def test_bad_config_is_a_clear_error(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[teacher]\nepoch = 3\n")
    assert main(["run", "--preset", "smoke", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "bad.toml.teacher: unknown field 'epoch'" in err


def test_student_command_trains_one_student(tiny_lm, tmp_path, capsys):
    import json

    from kdaudit.data.records import write_jsonl
    from kdaudit.models import build_zoo_model

    model, tok, records, teacher_path = tiny_lm
    base = tmp_path / "base"
    build_zoo_model("gpt2-smoke-student", tok, seed=0).save_pretrained(base)
    tok.save_pretrained(base)
    data = tmp_path / "public.jsonl"
    write_jsonl(records[:24], data)
    cfg = tmp_path / "kd.toml"
    cfg.write_text("[kd]\nmax_new_tokens = 8\n[student]\nbatch_size = 8\n")
    out = tmp_path / "imitkd"
    assert main(["student", "--method", "imitkd", "--student-base", str(base), "--teacher",
                 str(teacher_path), "--data", str(data), "--preset", "smoke", "--config",
                 str(cfg), "--epochs", "1", "--out", str(out)]) == 0
    assert "imitkd: 3 steps" in capsys.readouterr().out
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    log = [json.loads(x) for x in (out / "train_log.jsonl").open()]
    assert all(r["generated"] > 0 for r in log)        # the student wrote its own batches
    assert main(["student", "--method", "gkd", "--student-base", str(base), "--data",
                 str(data), "--out", str(tmp_path / "x")]) == 2
    assert "give --teacher PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["student", "--method", "tarot", "--student-base", str(base), "--data",
              str(data), "--out", str(tmp_path / "x")])


def test_teacher_command_with_dp_records_the_epsilon_spent(tiny_lm, tmp_path, capsys):
    import json

    from kdaudit.data.records import write_jsonl
    from kdaudit.models import build_zoo_model

    _, tok, records, _ = tiny_lm
    base = tmp_path / "base"
    build_zoo_model("gpt2-smoke-student", tok, seed=0).save_pretrained(base)
    tok.save_pretrained(base)
    data = tmp_path / "members.jsonl"
    write_jsonl(records[:40], data)
    out = tmp_path / "dp_teacher"
    assert main(["teacher", "--base", str(base), "--data", str(data), "--dp", "--epsilon", "2",
                 "--preset", "smoke", "--epochs", "1", "--batch-size", "8", "--out",
                 str(out)]) == 0
    assert "epsilon 1.99" in capsys.readouterr().out   # the solver lands just under 2
    spent = json.loads((out / "privacy.json").read_text())
    assert spent["epsilon"] == pytest.approx(2.0, rel=1e-3) and spent["sampling"] == "poisson"
