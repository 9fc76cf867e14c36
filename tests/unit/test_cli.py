"""The command line: help everywhere, one-line errors with exit code 2 for user mistakes."""

from __future__ import annotations

import pytest

from bertscale.cli import build_parser, main

SUBCOMMANDS = ["corpus", "tokenizer", "data", "pretrain", "finetune", "pipeline", "models", "submit", "doctor",
               "config", "export"]


@pytest.mark.parametrize("command", [[], *([c] for c in SUBCOMMANDS)])
def test_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    assert "usage: bertscale" in capsys.readouterr().out


def test_every_subcommand_is_registered():
    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    assert set(SUBCOMMANDS) <= set(choices)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["corpus", "/no/such/path", "--no-tracking"], "corpus input /no/such/path does not exist"),
        (["config", "--set", "corpus.normalization=NFX"], "corpus.normalization"),
        (["config", "--set", "novalue"], "key.path=value"),
        (["config", "--config", "/no/such.yaml"], "does not exist"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err
    assert len(err.splitlines()) == 1
    assert "Traceback" not in err
