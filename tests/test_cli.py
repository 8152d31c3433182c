"""The CLI's fast paths: help, init, and errors that exit 2 with the field and fix."""

import pytest

from fedkeeper.cli import main, parser
from fedkeeper.core import config


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("run", "init", "status", "report", "setup"):
        assert cmd in out


def test_run_help_explains_the_default(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    assert "--rounds" in out and "digits" in out and "--resume" in out


def test_init_writes_a_valid_commented_config(tmp_path, capsys):
    path = tmp_path / "fed.yaml"
    assert main(["init", str(path)]) == 0
    text = path.read_text()
    assert text.count("#") > 20
    cfg = config.from_dict(config.load_file(str(path)))
    assert cfg.to_dict() == config.from_dict({}).to_dict()
    assert main(["init", str(path)]) == 2
    assert "--force" in capsys.readouterr().err


def test_bad_config_exits_2_naming_the_field(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  learning_rate: -3\n")
    assert main(["run", "--config", str(path), "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "model.learning_rate" in err and "Fix:" in err
    assert main(["run", "--model", "nn", "--partition", "zebra", "--store", str(tmp_path / "s")]) == 2
    assert "data.partition" in capsys.readouterr().err


def test_status_and_report_on_an_empty_store(tmp_path, capsys):
    assert main(["status", "--store", str(tmp_path)]) == 2
    assert "no federation" in capsys.readouterr().err
    assert main(["report", "--store", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert main(["run", "--resume"]) == 2


def test_unknown_store_scheme_is_explained(tmp_path, capsys):
    assert main(["status", "--store", "ftp://x/y"]) == 2
    assert "s3://" in capsys.readouterr().err


def test_parser_builds():
    assert parser().prog == "fedkeeper"
