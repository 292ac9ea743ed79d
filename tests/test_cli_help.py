"""Every command's --help shows what its options' help says, defaults included (rich took "[default: …]" in our
help texts for markup and dropped it: `train decoder --help` read "Encoder .")."""

from __future__ import annotations

import re

import pytest
from typer.testing import CliRunner

from analysis.cli import app as analysis_app
from pipeline.cli import featcache_app, train_app

APPS = {"featcache": featcache_app, "train": train_app, "analysis": analysis_app}


def _commands():
    for name, app in APPS.items():
        for command in app.registered_commands:
            yield name, app, command.name or command.callback.__name__.replace("_", "-")


@pytest.mark.parametrize("tool,app,command", list(_commands()), ids=lambda v: v if isinstance(v, str) else "")
def test_help_shows_every_options_help_whole(tool, app, command):
    import typer

    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400", "TERMINAL_WIDTH": "400"})
    assert res.exit_code == 0, res.output
    shown = " ".join(res.output.replace("│", " ").split())
    click_command = typer.main.get_command(app).commands[command]
    for param in click_command.params:
        text = getattr(param, "help", None)
        if not text or param.param_type_name != "option":
            continue
        for bracketed in re.findall(r"\[[^\]]*\]", text):  # what rich could take for markup
            assert " ".join(bracketed.split()) in shown, f"{tool} {command} {param.opts[0]}: {bracketed!r} not shown"
        assert "[default:" not in text, f"{tool} {command} {param.opts[0]}: write (default: …), rich hides [default: …]"
