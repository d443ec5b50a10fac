"""Collecting and reporting `dtm bench merge`'s measurements: the run loop, medians and spreads,
the table, results.json and chart.png."""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dtm_fast import ui
from dtm_fast.bench import merge_runs
from dtm_fast.bench.merge_models import PRESETS, build_models
from dtm_fast.errors import DtmError

log = logging.getLogger(__name__)


@dataclass
class Series:
    """Repeated measurements of one configuration."""

    tool: str  # "floor", "dtm" or "mergekit"
    method: str
    backend: str = ""
    walls_s: list[float] = field(default_factory=list)
    peak_rss_bytes: list[int] = field(default_factory=list)
    io_bytes: int = 0

    @property
    def label(self) -> str:
        return f"dtm ({self.backend})" if self.tool == "dtm" else self.tool

    @property
    def median_s(self) -> float:
        return statistics.median(self.walls_s)

    @property
    def typical_s(self) -> float:
        """The figure a ratio takes: the median of a tool's runs, but the fastest run of a floor. A
        floor is the least the machine needs to move the bytes; what its runs take beyond that is
        the machine's noise (the floors of one run ranged from 0.6 to 4.3 s for the same bytes)."""
        return min(self.walls_s) if self.tool in ("floor", "floor+fsync") else self.median_s

    @property
    def spread(self) -> float:
        """(max - min) / median of the repetitions."""
        return (max(self.walls_s) - min(self.walls_s)) / self.median_s if len(self.walls_s) > 1 else 0.0


@dataclass
class Measurements:
    preset: str
    command: str
    inputs_bytes: int
    output_bytes: int
    baseline_rss_bytes: int
    series: list[Series]
    machine: dict

    @classmethod
    def collect(cls, args) -> "Measurements":
        preset = PRESETS[args.preset]
        workdir = Path(args.workdir).resolve()
        repository = Path(__file__).resolve().parents[2]
        if (repository / ".git").exists() and workdir.is_relative_to(repository):
            raise DtmError(f"--workdir {workdir} is inside the repository {repository}; the synthetic models "
                           "are gigabytes: choose a directory outside it (default /tmp/dtm-bench-merge)")
        output = Path(args.output or f"bench/results/merge-{preset.name}").resolve()
        logs = output / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        base, models = build_models(workdir, preset, args.models, args.noise)
        backends = args.backends or ["auto"]
        mergekit_version = None if args.no_mergekit else merge_runs.mergekit_version()
        if not args.no_mergekit and mergekit_version is None:
            ui.warn("mergekit is not installed: timing dtm and the floor only (pip install mergekit)")
        model_files = {path: sorted(path.glob("*.safetensors")) for path in [base, *models]}
        out_bytes = merge_runs.model_bytes(base)
        buffer = bytearray(merge_runs.FLOOR_BUFFER_BYTES)
        ui.info("warming the page cache with every input file")
        merge_runs.read_files_s([f for files in model_files.values() for f in files], buffer)

        series: dict[tuple[str, str, str], Series] = {}

        def entry(tool: str, method: str, backend: str, inputs: list[Path]) -> Series:
            key = (tool, method, backend)
            if key not in series:
                io_bytes = sum(merge_runs.model_bytes(path) for path in inputs) + out_bytes
                series[key] = Series(tool, method, backend, io_bytes=io_bytes)
            return series[key]

        machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                   "mergekit": mergekit_version, "load_before": os.getloadavg()}
        baseline = merge_runs.interpreter_baseline(logs / "baseline.log")
        # this run's own outputs (runs that share a --workdir share only its models), removed at the end
        scratch = Path(tempfile.mkdtemp(prefix="outputs-", dir=workdir))
        try:
            configs = {method: merge_runs.write_config(method, base, models, logs) for method in args.methods}
            for repetition in range(max(args.repeats, args.mergekit_repeats)):
                for method in args.methods:
                    merged = merge_runs.merged_models(method, models)
                    inputs = ([base] if merge_runs.BENCH_METHODS[method].base else []) + merged
                    if repetition < args.repeats:
                        files = [f for path in inputs for f in model_files[path]]
                        read_s = merge_runs.read_files_s(files, buffer)
                        entry("floor", method, "", inputs).walls_s.append(
                            read_s + merge_runs.write_bytes_s(scratch / "floor.bin", out_bytes, buffer))
                        # a published output is durable: the floor of writing it with an fsync
                        read_s = merge_runs.read_files_s(files, buffer)
                        entry("floor+fsync", method, "", inputs).walls_s.append(
                            read_s + merge_runs.write_bytes_s(scratch / "floor.bin", out_bytes, buffer, durable=True))
                        for backend in backends:
                            target = scratch / f"dtm-{method}-{backend}"
                            command = merge_runs.dtm_command(configs[method], target, None if backend == "auto" else backend,
                                                             args.max_memory)
                            ui.info(f"[{repetition + 1}] dtm merge {configs[method].name} (backend {backend})")
                            measured = merge_runs.run_measured(command, logs / f"dtm-{method}-{backend}.log")
                            shutil.rmtree(target, ignore_errors=True)
                            record = entry("dtm", method, backend, inputs)
                            record.walls_s.append(measured.wall_s)
                            record.peak_rss_bytes.append(measured.peak_rss_bytes)
                    if mergekit_version and repetition < args.mergekit_repeats:
                        target = scratch / f"mergekit-{method}"
                        command = merge_runs.mergekit_command(configs[method], target)
                        ui.info(f"[{repetition + 1}] mergekit-yaml {configs[method].name}")
                        measured = merge_runs.run_measured(command, logs / f"mergekit-{method}.log")
                        shutil.rmtree(target, ignore_errors=True)
                        record = entry("mergekit", method, "", inputs)
                        record.walls_s.append(measured.wall_s)
                        record.peak_rss_bytes.append(measured.peak_rss_bytes)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        machine["load_after"] = os.getloadavg()
        inputs_bytes = sum(merge_runs.model_bytes(path) for path in [base, *models])
        return cls(preset.name, "dtm bench merge " + " ".join(sys.argv[3:] if sys.argv[1:3] == ["bench", "merge"]
                                                               else sys.argv[1:]),
                   inputs_bytes, out_bytes, baseline, list(series.values()), machine)


def _ratio(numerator: float | None, denominator: float | None) -> str:
    if not numerator or not denominator:
        return "-"
    return f"{numerator / denominator:.1f}x"


def rows(measurements: Measurements) -> list[list]:
    by_key = {(s.tool, s.method): s for s in measurements.series if s.tool != "dtm"}
    table = []
    for s in measurements.series:
        mergekit = by_key.get(("mergekit", s.method))
        floor = by_key.get(("floor", s.method))
        durable = by_key.get(("floor+fsync", s.method))
        table.append([
            s.method, s.label, f"{s.typical_s:.2f}", f"{100 * s.spread:.0f}%", f"{s.io_bytes / s.typical_s / 1e9:.2f}",
            ui.format_bytes(max(s.peak_rss_bytes)) if s.peak_rss_bytes else "-",
            _ratio(mergekit.median_s, s.typical_s) if mergekit and s.tool != "mergekit" else "-",
            _ratio(s.typical_s, floor.typical_s) if floor and s.tool != "floor" else "-",
            _ratio(s.median_s, durable.typical_s) if durable and s.tool not in ("floor", "floor+fsync") else "-",
        ])
    order = {"floor": 0, "floor+fsync": 1, "dtm": 2, "mergekit": 3}
    methods = list(merge_runs.BENCH_METHODS)
    return sorted(table, key=lambda row: (methods.index(row[0]), order[row[1].split()[0]], row[1]))


def publishing_cost(measurements: Measurements) -> str:
    """What publishing costs against the floor: every merge fsyncs each shard before it publishes
    (a published output survives power loss), so floor+fsync - floor is the part of any merge's
    time that is durability, not merging."""
    medians = {(s.tool, s.method): s.typical_s for s in measurements.series if s.tool in ("floor", "floor+fsync")}
    costs = [(durable - medians[("floor", method)], medians[("floor", method)])
             for (tool, method), durable in medians.items() if tool == "floor+fsync" and ("floor", method) in medians]
    if not costs:
        return ""
    extra = statistics.median(c for c, _ in costs)
    floor = statistics.median(f for _, f in costs)
    return (f"publishing (fsync of each shard, which every merge does before it publishes): {extra:+.2f} s over "
            f"the floor's {floor:.2f} s (median over methods; floor+fsync / floor {(floor + extra) / floor:.2f}x)")


COLUMNS = ["method", "tool", "wall s", "spread", "GB/s", "peak RSS", "mergekit / this", "this / floor",
           "this / floor+fsync"]


def _chart(measurements: Measurements, path: Path) -> None:
    """Each tool's wall time over the floor's, per method (1 = the I/O floor)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in merge_runs.BENCH_METHODS if any(s.method == m for s in measurements.series)]
    floors = {s.method: s.typical_s for s in measurements.series if s.tool == "floor"}
    labels = sorted({s.label for s in measurements.series if s.tool not in ("floor",)},
                    key=lambda l: (l == "mergekit", l != "floor+fsync", l))
    width = 0.8 / max(1, len(labels))
    figure, axes = plt.subplots(figsize=(max(9, 0.9 * len(methods)), 4.5))
    for index, label in enumerate(labels):
        values = [next((s.typical_s / floors[m] for s in measurements.series if s.label == label and s.method == m), 0.0)
                  for m in methods]
        axes.bar([i + index * width for i in range(len(methods))], values, width, label=label)
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xticks([i + width * (len(labels) - 1) / 2 for i in range(len(methods))], methods, rotation=30,
                    ha="right")
    axes.set_yscale("log")
    axes.set_ylabel("wall time / I/O floor (median, log scale)")
    axes.set_title(f"dtm bench merge: preset {measurements.preset}, "
                   f"{measurements.inputs_bytes / 1e9:.2f} GB of inputs")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def report(measurements: Measurements, args) -> None:
    output = Path(args.output or f"bench/results/merge-{measurements.preset}").resolve()
    table = rows(measurements)
    ui.table(f"dtm bench merge: {measurements.preset} ({measurements.inputs_bytes / 1e9:.2f} GB in, "
             f"{measurements.output_bytes / 1e9:.2f} GB out)", COLUMNS, table)
    spreads = [s.spread for s in measurements.series if len(s.walls_s) > 1]
    noise = (f"repetition spread (max-min)/median: median {100 * statistics.median(spreads):.0f}%, "
             f"worst {100 * max(spreads):.0f}%" if spreads else "one repetition: no spread measured")
    load = measurements.machine
    ui.info(f"{noise}; load average {load['load_before'][0]:.1f} before, {load['load_after'][0]:.1f} after "
            f"on {load['cpus']} CPUs; baseline RSS of the merge's imports {ui.format_bytes(measurements.baseline_rss_bytes)}")
    publishing = publishing_cost(measurements)
    if publishing:
        ui.info(publishing)
    record = asdict(measurements)
    record["table"] = {"columns": COLUMNS, "rows": table}
    record["publishing"] = publishing
    record["noise"] = noise
    record["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (output / "results.json").write_text(json.dumps(record, indent=1))
    _chart(measurements, output / "chart.png")
    ui.info(f"wrote {output / 'results.json'} and {output / 'chart.png'}")
