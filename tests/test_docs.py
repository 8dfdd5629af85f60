"""The README documents what the code does."""

from __future__ import annotations

import re
import subprocess
import sys

from embedq.settings import Settings
from tests.helpers import ROOT

README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_readme_table_with_its_default():
    for name, field in Settings.model_fields.items():
        row = re.search(rf"^\| `EMBEDQ_{name.upper()}` \| (.+?) \|", README, re.MULTILINE)
        assert row, f"EMBEDQ_{name.upper()} is missing from the README's settings table"
        default = "unset" if field.default is None else f"`{field.default}`"
        assert row.group(1) == default, f"EMBEDQ_{name.upper()}: README says {row.group(1)}"


def test_quick_start_has_exactly_the_two_commands():
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = re.findall(r"^make \w+", quick, re.MULTILINE)
    assert commands == ["make demo", "make test"]


def test_ci_runs_make_test():
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_cli_help_lists_the_commands():
    out = subprocess.run(
        [sys.executable, "-m", "embedq.cli", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("worker", "embed", "demo"):
        assert command in out.stdout


def test_beat_rebuilds_indexes_on_the_configured_interval():
    from embedq.app import app
    from embedq.settings import get_settings

    app.loader.import_default_modules()  # what a worker or beat does at start
    entry = app.conf.beat_schedule["embedq-rebuild-index"]
    assert entry["task"] == "embedq.rebuild_index"
    assert entry["task"] in app.tasks
    assert entry["schedule"] == get_settings().index_rebuild_s


def test_no_pickle_on_the_wire():
    from embedq.app import app

    assert "pickle" not in app.conf.accept_content
    assert "pickle" not in app.conf.result_accept_content
    assert app.conf.task_serializer == app.conf.result_serializer == "embedq-msgpack"
