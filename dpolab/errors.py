"""The error boundary of every command (``dpolab train``, ``python -m dpolab.experiments.penn``,
``python -m dpolab.bench``): an expected failure prints one line and sets the exit status.

    exit 0   done
    exit 1   the run failed after it started (an endpoint down, a NaN loss, a full disk, an unexpected error)
    exit 2   bad input: a flag, a file, a model, a folder, a device; argparse's usage errors too
    exit 130 interrupted (Ctrl-C)

(``make`` reports any failing command as its own exit status 2.) The line reads ``<prog>: error: <message>``, and
each message names the input, the problem and the fix. ``--debug`` or ``DPOLAB_DEBUG=1`` prints the traceback
above it.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable

__all__ = ["InputError", "EXIT_FAILED", "EXIT_INPUT", "exit_status", "one_line", "debug_requested", "run_command"]

EXIT_FAILED, EXIT_INPUT, EXIT_INTERRUPTED = 1, 2, 130


class InputError(ValueError):
    """Bad input (data, model, folder, settings): the command exits with status 2."""


# Exceptions that mean bad input, besides InputError and ValueError (config validation, data problems).
_INPUT_OS_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, NotADirectoryError, IsADirectoryError)
# Input errors of dpolab modules, looked up only once their module is imported (an error of a module that was
# never imported cannot have been raised), so that this module imports neither torch nor datasets.
_INPUT_ERRORS_OF = {"dpolab.models": "ModelNotAvailableError", "dpolab.data.io": "HubUnreachableError"}
# Expected failures of a run: one line, exit 1.
_RUN_FAILURES_OF = {
    "dpolab.judge": "JudgeUnavailableError",
    "dpolab.train.objective": "NonFiniteError",
    "dpolab.train.checkpoint": "CheckpointError",
}
_HINTS = {  # appended to an OSError's own message, by errno
    errno.EACCES: "check the permissions of that path, or choose another one",
    errno.EPERM: "check the permissions of that path, or choose another one",
    errno.EROFS: "the file system is read-only: choose a path on a writable one",
    errno.ENOSPC: "the disk is full: free some space and rerun (a training run continues with --resume)",
}


def _types_of(table: dict[str, str]) -> tuple[type, ...]:
    return tuple(getattr(sys.modules[m], name) for m, name in table.items() if m in sys.modules)


def exit_status(err: BaseException) -> int:
    """2 for bad input, 130 for an interrupt, 1 for anything else."""
    if isinstance(err, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(err, (ValueError, *_INPUT_OS_ERRORS, *_types_of(_INPUT_ERRORS_OF))):
        return EXIT_INPUT
    return EXIT_FAILED


def _expected(err: BaseException) -> bool:
    return isinstance(err, (ValueError, OSError, *_types_of(_INPUT_ERRORS_OF), *_types_of(_RUN_FAILURES_OF)))


def one_line(err: BaseException) -> str:
    """What the boundary prints after ``error:``: the message of an expected error (with a hint for an OSError that
    has none), or the type and message of an unexpected one with the way to see its traceback."""
    if isinstance(err, KeyboardInterrupt):
        return "interrupted (a training run continues from its last checkpoint with --resume)"
    message = str(err) or type(err).__name__
    system = err if isinstance(err, OSError) else err.__cause__  # the system's own message, maybe wrapped
    if isinstance(system, OSError) and system.strerror and system.errno in _HINTS:  # it names no fix: add it
        message = f"{message}: {_HINTS[system.errno]}"
    if not _expected(err):
        message = (
            f"{type(err).__name__}: {message} (unexpected; rerun with --debug or DPOLAB_DEBUG=1 for the traceback)"
        )
    return message


def debug_requested(flag: bool = False) -> bool:
    """True when ``--debug`` was given or ``DPOLAB_DEBUG`` is set to 1 (or true, yes, on)."""
    return flag or os.environ.get("DPOLAB_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}


def run_command(body: Callable[[], int | None], prog: str, debug: bool = False) -> int:
    """Run ``body`` and return the exit status: its own (None counts as 0), or that of the error it raised, after
    printing ``<prog>: error: <message>`` to stderr (and the traceback first when ``debug``)."""
    try:
        return int(body() or 0)
    except SystemExit:
        raise
    except (Exception, KeyboardInterrupt) as err:
        if debug_requested(debug):
            traceback.print_exc()
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
        return exit_status(err)
