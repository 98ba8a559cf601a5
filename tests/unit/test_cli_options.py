"""Common options work before and after the command name (an option before it used to be silently
overwritten by the subcommand's own default)."""

from __future__ import annotations

import pytest

from adapter import cli
from adapter.cli import _parser


@pytest.mark.parametrize("argv", [
    ["--config", "site.toml", "--state", "s.db", "--fhir-url", "http://fhir.example", "run", "--dry-run"],
    ["run", "--dry-run", "--config", "site.toml", "--state", "s.db", "--fhir-url", "http://fhir.example"],
    ["--config", "site.toml", "run", "--state", "s.db", "--dry-run", "--fhir-url", "http://fhir.example"],
])
def test_common_options_are_kept_wherever_they_stand(argv):
    args = _parser().parse_args(argv)
    assert (args.config, args.state, args.fhir_url, args.dry_run) == ("site.toml", "s.db", "http://fhir.example", True)


def test_defaults_when_no_common_option_is_given():
    args = _parser().parse_args(["status"])
    assert (args.config, args.state, args.log_level, args.metrics_file) == (None, None, "INFO", None)


def test_the_option_after_the_command_wins():
    args = _parser().parse_args(["--log-level", "DEBUG", "status", "--log-level", "ERROR"])
    assert args.log_level == "ERROR"


def test_the_console_script_freezes_what_the_imports_built_before_running(monkeypatch):
    import gc

    monkeypatch.setattr(cli, "main", lambda argv=None: gc.get_freeze_count())
    try:
        assert cli.console() > 1000  # the imported modules' objects: out of every later collection's way
    finally:
        gc.unfreeze()


def test_the_console_script_collects_young_objects_less_often_than_every_700(monkeypatch):
    import gc

    before = gc.get_threshold()
    monkeypatch.setattr(cli, "main", lambda argv=None: gc.get_threshold())
    try:
        young, *older = cli.console()
        assert young >= 50_000 and tuple(older) == before[1:]  # a page's parse no longer triggers dozens
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
