"""lib.common.errors and lib.common.cli: exit codes by class, never by message text."""

from __future__ import annotations

import argparse

import pytest

from lib.common import cli, errors
from lib.common.settings import ConfigError


@pytest.mark.parametrize("error, code", [
    (ConfigError(["batch_size must be >= 1; got 0"]), 2),
    (errors.BadInput("bad"), 2),
    (errors.OutputError("into the masks"), 2),
    (errors.SomeFailed("2 images failed: a.tif, b.tif"), 1),
    (errors.Resumable("stopped at step 40 (SIGTERM); rerun to resume"), 3),
    # the message mentions "step" and "settings": the code comes from the class alone
    (errors.Resumable("bad settings at step 3"), 3),
    (errors.BadInput("stopped at step 3"), 2),
])
def test_errors_map_to_their_exit_code(error, code, capsys):
    def body():
        raise error

    assert cli.run_main(body, prog="tool") == code
    err = capsys.readouterr().err
    assert err.startswith("tool: error: ") and str(error) in err and "Traceback" not in err


def test_config_error_lists_every_violation_and_is_a_value_error():
    error = ConfigError(["a must be >= 1; got 0", "b must be a folder; got 'x'"])
    assert isinstance(error, ValueError) and error.exit_code == 2
    assert str(error).splitlines() == ["invalid settings:", "  - a must be >= 1; got 0",
                                       "  - b must be a folder; got 'x'"]


def test_an_unexpected_exception_is_a_bug_and_keeps_its_traceback():
    def body():
        raise ValueError("a programming error")  # not a ToolkitError: must not become "bad settings"

    with pytest.raises(ValueError, match="a programming error"):
        cli.run_main(body)


@pytest.mark.parametrize("returned, code", [(None, 0), (0, 0), (1, 1), (3, 3)])
def test_the_body_returns_the_exit_code(returned, code):
    assert cli.run_main(lambda: returned) == code


def test_keyboard_interrupt_exits_130(capsys):
    def body():
        raise KeyboardInterrupt

    assert cli.run_main(body) == 130


@pytest.mark.parametrize("text, value", [("1", True), ("true", True), ("Yes", True), ("on", True),
                                         ("0", False), ("false", False), ("no", False), ("OFF", False)])
def test_flag_bool(text, value):
    assert cli.flag_bool(text) is value


def test_flag_bool_rejects_other_words():
    with pytest.raises(argparse.ArgumentTypeError, match="must be one of 1/0, true/false, yes/no; got 'maybe'"):
        cli.flag_bool("maybe")


def test_sigterm_stops_a_command_as_resumable(capsys):
    import os
    import signal
    import time

    before = signal.getsignal(signal.SIGTERM)

    def body():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler interrupts this at once
        return 0

    started = time.monotonic()
    assert cli.run_main(body, prog="tool") == 3
    assert time.monotonic() - started < 4
    err = capsys.readouterr().err
    assert err.startswith("tool: error: stopped by SIGTERM") and "Rerun the same command to continue" in err
    assert signal.getsignal(signal.SIGTERM) == before  # the caller's handler is back
