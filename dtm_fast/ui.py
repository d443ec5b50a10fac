"""The terminal UI: the only module that imports `rich`.

Three output modes, chosen once per process by `configure()`:
- "rich": live progress bars (bytes, GB/s, ETA, memory against the budget), used on a TTY;
- "plain": one log line per stage update, at most every few seconds (CI logs, pipes, `--quiet`);
- "json": one JSON object per line on stdout, for machines (`--json`).
In a distributed run only rank 0 prints (RANK environment variable, as set by torchrun).
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import contextmanager
from typing import Any, Iterator

_mode = None  # set by configure(); None means "decide on first use"
_console = None
PLAIN_INTERVAL_S = 5.0


def _is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def configure(json_output: bool = False, quiet: bool = False) -> str:
    """Pick the output mode for this process and return it."""
    global _mode
    if json_output:
        _mode = "json"
    elif quiet or not sys.stderr.isatty():
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

        _console = Console(stderr=True)
    return _console


def _emit_json(record: dict[str, Any]) -> None:
    print(json.dumps(record, default=str), flush=True)


def info(message: str) -> None:
    if not _is_rank_zero():
        return
    if mode() == "json":
        _emit_json({"event": "info", "message": message})
    elif mode() == "rich":
        _rich_console().print(message, highlight=False)
    else:
        print(message, file=sys.stderr, flush=True)


def warn(message: str) -> None:
    if not _is_rank_zero():
        return
    if mode() == "json":
        _emit_json({"event": "warning", "message": message})
    elif mode() == "rich":
        _rich_console().print(f"[yellow]warning:[/yellow] {message}", highlight=False)
    else:
        print(f"warning: {message}", file=sys.stderr, flush=True)


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
                  file=sys.stderr, flush=True)


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
        print(f"[{name}] done in {elapsed:.1f}s", file=sys.stderr, flush=True)


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
        print(text, file=sys.stderr, flush=True)


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
    print("\n".join(lines), flush=True)
