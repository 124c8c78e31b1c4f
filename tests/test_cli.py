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
