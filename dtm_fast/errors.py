"""The one exception type for mistakes a user can make (bad file, bad field, bad option), and the
guard every entry point runs its command under.

A DtmError prints as one line, without a traceback. An OSError that names a file (permission
denied, disk full, read-only filesystem) is the machine's state, not a bug: one line too. Anything
else is a bug in dtm_fast: the user still gets one line, plus the path of a log file that holds the
traceback to report (`--debug`, or DTM_DEBUG=1, prints it instead).
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Callable


class DtmError(Exception):
    """A user-facing error: the message says what was wrong, where, and what to do."""


class Interrupted(Exception):
    """Raised by a command that caught Ctrl-C or SIGTERM and knows how the user continues."""


def shown(value: object) -> str:
    """A user-given path or name as it goes into a one-line message: as typed when printable,
    else quoted with its control characters escaped (a newline in a path must not break the line)."""
    text = str(value)
    return text if text.isprintable() else repr(text)


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """`--debug` anywhere on the command line (removed from it), or DTM_DEBUG=1."""
    debug = "--debug" in argv or os.environ.get("DTM_DEBUG", "") not in ("", "0")
    return debug, [item for item in argv if item != "--debug"]


def log_directory() -> str:
    """Where tracebacks of unexpected errors go: $DTM_LOG_DIR, else the user's state directory."""
    chosen = os.environ.get("DTM_LOG_DIR")
    if chosen:
        return chosen
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "dtm_fast", "logs")


def write_crash_log(command: str, argv: list[str]) -> str | None:
    """Write the current exception's traceback to a new log file; returns its path (None if no
    directory could take it)."""
    import tempfile
    import time
    import traceback

    from dtm_fast import __version__

    text = (f"dtm_fast {__version__}, Python {sys.version.split()[0]}\n"
            f"command: dtm {command}, arguments: {' '.join(argv)}\n"
            f"time: {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n{traceback.format_exc()}")
    name = f"dtm-{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for directory in (log_directory(), tempfile.gettempdir()):
        try:
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, name)
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(text)
            return path
        except OSError:
            continue
    return None


def describe_os_error(error: OSError) -> str | None:
    """One line for an OSError about a file, or None when it names no file (then it is a bug)."""
    if error.filename is None:
        return None
    where = str(error.filename) + (f" -> {error.filename2}" if error.filename2 is not None else "")
    reason = error.strerror or str(error)
    hints = {errno.ENOSPC: "free some space, then rerun (finished work is kept)",
             errno.EDQUOT: "free some space, then rerun (finished work is kept)",
             errno.EACCES: "check the permissions, or choose another path",
             errno.EPERM: "check the permissions, or choose another path",
             errno.EROFS: "the filesystem is read-only; choose another path",
             errno.ENOTDIR: "a part of the path is a file, not a directory",
             errno.EISDIR: "give a file, not a directory",
             errno.ENOENT: "check the path"}
    hint = hints.get(error.errno)
    return f"{where}: {reason}" + (f"; {hint}" if hint else "")


def run_guarded(command: str, body: Callable[[], int], argv: list[str], debug: bool) -> int:
    """Run one command; turn every way it can end into an exit code and at most one line of error
    (plus a log path for bugs). Exit codes: 0 done, 1 error, 130 interrupted."""
    try:
        return int(body() or 0)
    except DtmError as error:
        _say(command, f"error: {error}")
        return 1
    except Interrupted as interruption:
        _say(command, f"interrupted; {interruption}")
        return 130
    except KeyboardInterrupt:
        _say(command, "interrupted")
        return 130
    except BrokenPipeError:
        return 1  # the reader of our output went away (`| head`); nothing to tell it
    except OSError as error:
        if debug:
            raise
        message = describe_os_error(error)
        if message is None:
            return _report_bug(command, error, argv)
        log = write_crash_log(command, argv)
        _say(command, f"error: {message}" + (f" (details: {log})" if log else ""))
        return 1
    except Exception as error:  # anything else is a bug of ours; the user still gets one line
        if debug:
            raise
        return _report_bug(command, error, argv)


def _report_bug(command: str, error: BaseException, argv: list[str]) -> int:
    log = write_crash_log(command, argv)
    where = f"; the traceback is in {log}" if log else ""
    summary = str(error).splitlines()[0][:300] if str(error) else ""
    _say(command, f"internal error: {type(error).__name__}: {summary}{where}. This is a bug in dtm_fast: please "
                  "report it with that file (rerun with --debug to see the traceback here)")
    return 1


def _say(command: str, text: str) -> None:
    first, _, rest = text.partition("\n")
    print(f"dtm {command}: {first}" + (f"\n{rest}" if rest else ""), file=sys.stderr, flush=True)
