"""The pieces every command line shares: truth-value flags, the parser, errors to exit codes.

This is the only ``lib`` module that imports argparse. Each CLI script builds its parser with
:func:`make_parser`, maps the flags onto its typed config, and runs its one library call
through :func:`run_main`, which turns every :class:`~lib.common.errors.ToolkitError` into its
message on stderr and its exit code. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Callable

from .errors import Resumable, ToolkitError
from .help_text import example


def flag_bool(text: str) -> bool:
    """Parse a command-line truth value as NIST's scripts take them: 1/0, true/false, yes/no, on/off."""
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"must be one of 1/0, true/false, yes/no; got {text!r}")


def _is_flag_bool(action: argparse.Action) -> bool:
    return action.type is flag_bool


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` as users read it: each default shown once, 0/1 flags as ``{0,1}``, a short usage line.

    A flag's default is appended as ``(default: X)`` unless its help already says "default",
    it has none (None), it is required, or it is an on/off switch (``store_true``). Truth-value
    flags (:func:`flag_bool`) show ``{0,1}`` and their default as 1 or 0. The usage line names
    the required flags and ``[options]`` instead of every flag.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text.lower() or default is None or default is argparse.SUPPRESS or action.required:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) or action.nargs == 0:
            return text
        if _is_flag_bool(action) and isinstance(default, bool):
            default = int(default)
        elif isinstance(default, (list, tuple)):
            default = " ".join(str(v) for v in default)
        return f"{text} (default: {str(default).replace('%', '%%')})"

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        return "{0,1}" if _is_flag_bool(action) else super()._get_default_metavar_for_optional(action)

    def _format_usage(self, usage, actions, groups, prefix) -> str:
        if usage is None:
            shown = [a for a in actions if a.required or not a.option_strings]
            text = super()._format_usage(None, shown, [], prefix).rstrip("\n")
            return text + " [options]\n\n"
        return super()._format_usage(usage, actions, groups, prefix)


class ToolkitParser(argparse.ArgumentParser):
    """An ArgumentParser whose ``--help`` opens with the program's example (:mod:`lib.common.help_text`)."""

    def format_help(self) -> str:
        text = super().format_help()
        shown = example(self.prog)
        if shown is None:
            return text
        block = "example:\n" + "\n".join("  " + line for line in shown.splitlines())
        return f"{block}\n\n{text}"


def make_parser(description: str, epilog: str | None = None, prog: str | None = None) -> argparse.ArgumentParser:
    """The parser of a CLI (flag groups are added by the caller): :class:`HelpFormatter` help, the
    example of ``prog`` (default: the script's name) at the top of ``--help``."""
    return ToolkitParser(prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter)


def settings_table(title: str, settings: dict, defaults: dict | None = None, saved: str | None = None) -> str:
    """The settings a command prints at its start: a short table of those that differ from ``defaults``
    (all of them when ``defaults`` is None), then where the full list is (``saved``, a JSON file).

    One format for every CLI: ``TITLE settings:`` then ``  name  value`` lines, aligned.
    """
    defaults = defaults or {}
    shown = {k: v for k, v in settings.items() if k not in defaults or defaults[k] != v}
    width = max((len(k) for k in shown), default=0)
    lines = [f"{title} settings:"] + [f"  {k.ljust(width)}  {_shown_value(v)}" for k, v in shown.items()]
    rest = len(settings) - len(shown)
    tail = []
    if rest:
        tail.append(f"{rest} more at their defaults")
    if saved:
        tail.append(f"all in {saved}")
    if tail:
        lines.append(f"  ({'; '.join(tail)})")
    return "\n".join(lines)


def _shown_value(value) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return str(value)


def report_error(error: BaseException, prog: str | None = None) -> None:
    """Print a user-caused error as one message on stderr (no traceback)."""
    prog = prog or sys.argv[0].rsplit("/", 1)[-1]
    print(f"{prog}: error: {error}", file=sys.stderr)


class Terminated(Resumable):
    """SIGTERM (SLURM's pre-emption and wall-time signal) reached a command: exit 3, rerun to continue."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated("stopped by SIGTERM (pre-emption or wall time); every output written so far is whole. "
                     "Rerun the same command to continue")


def run_main(body: Callable[[], int | None], prog: str | None = None) -> int:
    """Run a CLI's body; map :class:`ToolkitError` to its exit code and message.

    ``body`` returns the exit code (``None`` means 0). SIGTERM raises :class:`Terminated`
    (exit 3) in the main thread unless the body installs a handler of its own (training
    checkpoints first; the build removes its temporary folder). ``KeyboardInterrupt`` exits
    130 as a shell would. Any other exception is a bug: it propagates with its traceback (exit 1).
    """
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = body()
    except ToolkitError as error:
        report_error(error, prog)
        return error.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0 if code is None else int(code)
