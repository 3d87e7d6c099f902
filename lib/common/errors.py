"""One base exception for everything a user can cause, and the exit codes of every CLI.

Exit codes (ARCHITECTURE.md, contract 5):

====  ==========================================================================
0     done
1     done, but some items failed (each one named in the output)
2     bad input or settings: nothing was done
3     stopped early and resumable (wall-time limit, pre-emption): rerun the same command
====  ==========================================================================

Every error class a user can trigger derives from :class:`ToolkitError` and carries its exit
code as the class attribute ``exit_code``; CLIs map exceptions to exit codes by class
(:func:`lib.common.cli.run_main`), never by message text. Anything else that escapes is a
bug: it keeps its traceback and exits 1.
"""

from __future__ import annotations

EXIT_DONE = 0
EXIT_SOME_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_RESUMABLE = 3


class ToolkitError(Exception):
    """Base of every error a user can cause. ``exit_code`` says how the CLI ends."""

    exit_code = EXIT_BAD_INPUT


class BadInput(ToolkitError):
    """Bad input or settings, found before anything was written (exit 2)."""

    exit_code = EXIT_BAD_INPUT


class SomeFailed(ToolkitError):
    """The job ran, but some items failed; each is named in the message (exit 1)."""

    exit_code = EXIT_SOME_FAILED


class Resumable(ToolkitError):
    """Stopped early with its state saved (signal, wall time): rerun the same command (exit 3)."""

    exit_code = EXIT_RESUMABLE


class OutputError(BadInput):
    """An output that would be written into an input folder or over a file this tool did not write."""
