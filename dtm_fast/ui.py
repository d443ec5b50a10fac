"""The terminal UI: the only module that imports `rich`.

Three output modes, chosen once per process by `configure()`:
- "rich": live progress bars (bytes, GB/s, ETA, memory against the budget), used on a TTY;
- "plain": one log line per stage update, at most every few seconds (CI logs, pipes, `--quiet`);
- "json": one JSON object per line on stdout, for machines (`--json`).
In a distributed run only rank 0 prints (RANK environment variable, as set by torchrun).
DTM_UI=json in the environment forces the json mode (how `dtm run` reads a training subprocess).

`library_output_to(log_file)` keeps the terminal for dtm's own lines: everything else written to
stdout/stderr while it is active (log lines and progress bars of transformers, lm-evaluation-harness,
datasets, tqdm, warnings, even C libraries) goes to the log file, at the file-descriptor level.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, TextIO

_mode = None  # set by configure(); None means "decide on first use"
_console = None
PLAIN_INTERVAL_S = 5.0
# where dtm's own lines go: the process's stdout/stderr, or the terminal saved by library_output_to
_out: TextIO | None = None
_NO_LOCK = __import__("contextlib").nullcontext()
_err: TextIO | None = None


def _stdout() -> TextIO:
    return _out or sys.stdout


def _stderr() -> TextIO:
    return _err or sys.stderr


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def configure(json_output: bool = False, quiet: bool = False) -> str:
    """Pick the output mode for this process and return it."""
    global _mode
    if json_output or os.environ.get("DTM_UI") == "json":
        _mode = "json"
    elif quiet or not _stderr().isatty():
        _mode = "plain"
    else:
        _mode = "rich"
    return _mode


def mode() -> str:
    return _mode or configure()


def _rich_console():
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(file=_stderr())
    return _console


def _emit_json(record: dict[str, Any]) -> None:
    from dtm_fast.io.atomic import dumps_json

    print(dumps_json(record, indent=None), end="", file=_stdout(), flush=True)  # strict JSON: NaN becomes null


def info(message: str) -> None:
    _say(message, "info", "", "")


def warn(message: str) -> None:
    _say(message, "warning", "warning: ", "[yellow]warning:[/yellow] ")


def _say(message: str, event: str, plain_prefix: str, rich_prefix: str) -> None:
    """One message on rank 0, in the output mode's form: a JSON event, rich text or a plain line."""
    if not _is_rank_zero():
        return
    if mode() == "json":
        _emit_json({"event": event, "message": message})
    elif mode() == "rich":
        _rich_console().print(f"{rich_prefix}{message}", highlight=False)
    else:
        print(f"{plain_prefix}{message}", file=_stderr(), flush=True)


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


class Stage:
    """Progress of one stage. `advance(n, **fields)` adds n units of work and updates the extra
    fields shown beside the bar (for example memory=..., tensors=...)."""

    def __init__(self, name: str, total: float, unit: str, budget_bytes: int | None):
        self.name = name
        self.total = total
        self.unit = unit
        self.budget_bytes = budget_bytes
        self.done = 0.0
        self.fields: dict[str, Any] = {}
        self.started = time.perf_counter()
        self._last_plain = 0.0
        self._rich_progress = None
        self._rich_task = None

    # rate and ETA are derived, never stored
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def eta_s(self) -> float | None:
        rate = self.rate()
        return (self.total - self.done) / rate if rate > 0 and self.total else None

    def _describe_fields(self) -> str:
        parts = []
        for key, value in self.fields.items():
            if key == "memory" and isinstance(value, (int, float)):
                budget = f" / {format_bytes(self.budget_bytes)}" if self.budget_bytes else ""
                parts.append(f"mem {format_bytes(value)}{budget}")
            else:
                parts.append(f"{key} {value}")
        return "  ".join(parts)

    def _rate_text(self) -> str:
        if self.unit == "bytes":
            return f"{self.rate() / 1e9:.2f} GB/s"
        return f"{self.rate():.1f} {self.unit}/s"

    def advance(self, amount: float = 1, **fields: Any) -> None:
        self.done += amount
        self.fields.update(fields)
        if not _is_rank_zero():
            return
        current = mode()
        if current == "rich" and self._rich_progress is not None:
            self._rich_progress.update(self._rich_task, completed=self.done, extra=self._describe_fields())
            return
        now = time.perf_counter()
        finished = self.total and self.done >= self.total
        if now - self._last_plain < PLAIN_INTERVAL_S and not finished:
            return
        self._last_plain = now
        if current == "json":
            _emit_json({"event": "progress", "stage": self.name, "done": self.done, "total": self.total,
                        "unit": self.unit, "rate": self.rate(), "eta_s": self.eta_s(), **self.fields})
        else:
            eta = self.eta_s()
            done = format_bytes(self.done) if self.unit == "bytes" else f"{self.done:g}"
            total = format_bytes(self.total) if self.unit == "bytes" else f"{self.total:g}"
            eta_text = f"  eta {eta:.0f}s" if eta is not None else ""
            print(f"[{self.name}] {done}/{total}  {self._rate_text()}{eta_text}  {self._describe_fields()}",
                  file=_stderr(), flush=True)


@contextmanager
def stage(name: str, total: float, unit: str = "bytes", budget_bytes: int | None = None) -> Iterator[Stage]:
    """A progress display for one stage of work of `total` units."""
    progress_stage = Stage(name, total, unit, budget_bytes)
    if mode() == "rich" and _is_rank_zero():
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn, DownloadColumn

        columns = [TextColumn("[bold]{task.description}"), BarColumn()]
        if unit == "bytes":
            columns += [DownloadColumn(binary_units=True), TransferSpeedColumn()]
        else:
            columns += [TextColumn("{task.completed:g}/{task.total:g} " + unit)]
        columns += [TimeRemainingColumn(), TextColumn("{task.fields[extra]}")]
        with Progress(*columns, console=_rich_console(), transient=False) as progress:
            progress_stage._rich_progress = progress
            progress_stage._rich_task = progress.add_task(name, total=total or None, extra="")
            yield progress_stage
    else:
        yield progress_stage
        if progress_stage.total and progress_stage.done < progress_stage.total:
            return  # an interrupted stage prints no "done" line
    elapsed = time.perf_counter() - progress_stage.started
    if mode() == "plain" and _is_rank_zero():
        print(f"[{name}] done in {elapsed:.1f}s", file=_stderr(), flush=True)


def metrics(record: dict[str, Any]) -> None:
    """One line of training metrics (step, loss, lr, tokens/s, ETA, memory)."""
    if not _is_rank_zero():
        return
    if mode() == "json":
        _emit_json({"event": "metrics", **record})
        return
    text = "  ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                     for key, value in record.items())
    if mode() == "rich":
        _rich_console().print(text, highlight=False)
    else:
        print(text, file=_stderr(), flush=True)


def table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A results table (benchmarks, the alignment-tax report)."""
    if not _is_rank_zero():
        return
    if mode() == "json":
        _emit_json({"event": "table", "title": title, "columns": columns, "rows": rows})
        return
    if mode() == "rich":
        from rich.table import Table

        rich_table = Table(title=title)
        for column in columns:
            rich_table.add_column(column)
        for row in rows:
            rich_table.add_row(*[str(cell) for cell in row])
        _rich_console().print(rich_table)
        return
    widths = [max(len(str(column)), *(len(str(row[i])) for row in rows)) if rows else len(column)
              for i, column in enumerate(columns)]
    lines = [title, "  ".join(str(c).ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)) for row in rows]
    print("\n".join(lines), file=_stdout(), flush=True)


class _TerminalWarnings(logging.Handler):
    """dtm's own warnings still reach the terminal while library output goes to the log."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("dtm_fast") and record.levelno >= logging.WARNING:
            warn(record.getMessage())


def _terminal_stream(stream: TextIO, fd: int) -> tuple[TextIO, int | None]:
    """A stream that keeps writing where `stream` writes now, after fd is pointed elsewhere."""
    try:
        if stream.fileno() != fd:
            return stream, None
    except (AttributeError, OSError, ValueError):
        return stream, None  # not backed by fd (a test's capture): it is not redirected anyway
    copy = os.dup(fd)
    return os.fdopen(copy, "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                     errors="replace", closefd=True), copy


@contextmanager
def library_output_to(log_file: Path) -> Iterator[Path]:
    """Send every line written to stdout/stderr (and every log record) to `log_file` while active;
    dtm's own output (info, warn, tables, progress) still goes to the terminal. Nested uses keep the
    outer log file."""
    global _out, _err, _console
    if _out is not None or _err is not None:
        yield log_file
        return
    log_file = Path(log_file)
    # a log whose folder does not exist yet goes to a temporary file first, and moves beside the
    # output once the command has made that folder (a command that fails early creates nothing)
    pending = not log_file.parent.is_dir()
    target = log_file
    if pending:
        import tempfile

        handle, name = tempfile.mkstemp(prefix="dtm-", suffix=".log")
        os.close(handle)
        log_file = Path(name)
    sys.stdout.flush()
    sys.stderr.flush()
    terminal_out, out_copy = _terminal_stream(sys.stdout, 1)
    terminal_err, err_copy = _terminal_stream(sys.stderr, 2)
    saved_fds = {fd: os.dup(fd) for fd in (1, 2)}
    saved_streams = (sys.stdout, sys.stderr)
    log = open(log_file, "a", buffering=1, encoding="utf-8", errors="replace")
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    file_handler = logging.StreamHandler(log)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    warnings_handler = _TerminalWarnings()
    os.environ["DTM_LIBRARY_LOG"] = str(log_file)
    _out, _err, previous_console = terminal_out, terminal_err, _console
    _console = None
    try:
        for fd in (1, 2):
            os.dup2(log.fileno(), fd)
        sys.stdout = sys.stderr = log
        root.handlers = [file_handler, warnings_handler]
        # libraries that hold their own handler on the old stream object (transformers does)
        redirected = _point_stream_handlers(log)
        root.setLevel(min(saved_level, logging.INFO) if saved_level else logging.INFO)
        _quiet_library_progress()
        yield log_file
    finally:
        for handler, stream in locals().get("redirected", []):
            if stream is not None:
                _swap_stream(handler, stream)
        root.handlers, root.level = saved_handlers, saved_level
        sys.stdout, sys.stderr = saved_streams
        for fd, copy in saved_fds.items():
            os.dup2(copy, fd)
            os.close(copy)
        _release_handlers_on(log)
        try:
            log.close()
        except ValueError:
            pass  # a library closed the buffer under sys.stdout (=log) by wrapping it: nothing left to flush
        if pending and target.parent.is_dir():
            with open(target, "ab") as destination:
                destination.write(log_file.read_bytes())
            log_file.unlink()  # the temporary file this function made
        os.environ.pop("DTM_LIBRARY_LOG", None)
        for stream, copy in ((terminal_out, out_copy), (terminal_err, err_copy)):
            if copy is not None:
                try:
                    stream.close()
                except ValueError:
                    pass
        _out = _err = None
        _console = previous_console


def _point_stream_handlers(log: TextIO) -> list[tuple[logging.StreamHandler, Any]]:
    """Libraries that hold a handler of their own on a terminal stream (transformers does, and
    does not propagate to the root logger): point it at the log while capturing."""
    moved = []
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith("dtm_fast"):
            continue
        for handler in getattr(logger, "handlers", []):
            # plain StreamHandlers only: subclasses (a test runner's capture, logging's last resort)
            # manage their streams themselves
            if type(handler) is logging.StreamHandler:
                moved.append((handler, _swap_stream(handler, log)))
    return moved


def _release_handlers_on(log: TextIO) -> None:
    """A library that set up its logging while output was captured holds a handler on the log
    file, which is about to close: point it at the restored stderr (fd 2) instead."""
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if type(handler) is logging.StreamHandler and handler.stream is log:
                _swap_stream(handler, sys.stderr)


def _swap_stream(handler: logging.StreamHandler, stream: Any) -> Any:
    """handler.setStream without its flush of a stream that may be closed already; returns the old one."""
    with handler.lock or _NO_LOCK:
        old = handler.stream
        if old is not None and not getattr(old, "closed", False):
            try:
                old.flush()
            except (OSError, ValueError):
                pass
        handler.stream = stream
    return old


def _quiet_library_progress() -> None:
    """Progress bars that libraries draw with carriage returns make a log file unreadable: turn
    them off where a library says how (they would go to the log file anyway)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for module, function in (("datasets", "disable_progress_bars"), ("transformers.utils.logging", "disable_progress_bar")):
        if module in sys.modules:
            try:
                getattr(sys.modules[module], function)()
            except AttributeError:
                pass
