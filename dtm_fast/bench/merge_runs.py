"""What `dtm bench merge` times: the I/O floor, `dtm merge` and `mergekit-yaml`, each merge run in
its own process whose peak RSS the kernel reports when it is reaped (os.wait4)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dtm_fast.errors import DtmError

@dataclass(frozen=True)
class BenchMethod:
    """How one method is benchmarked: the same mergekit YAML for mergekit-yaml and dtm merge."""

    base: bool  # merged against the base (the base is not one of the merged models)
    per_model: tuple[tuple[str, object], ...] = ()  # parameters of every merged model
    shared: tuple[tuple[str, object], ...] = ()
    max_models: int | None = None  # merged models at most (slerp: one)


DENSITY = 0.5
# every method of mergekit's that dtm has, with the parameters a user typically sets
BENCH_METHODS = {
    "linear": BenchMethod(False, (("weight", 1.0),)),
    "task_arithmetic": BenchMethod(True, (("weight", 1.0),), (("normalize", False),)),
    "ties": BenchMethod(True, (("weight", 1.0), ("density", DENSITY)), (("normalize", True),)),
    "dare_linear": BenchMethod(True, (("weight", 1.0), ("density", DENSITY))),
    "dare_ties": BenchMethod(True, (("weight", 1.0), ("density", DENSITY)), (("normalize", True),)),
    "breadcrumbs": BenchMethod(True, (("weight", 1.0), ("density", DENSITY), ("gamma", 0.01))),
    "breadcrumbs_ties": BenchMethod(True, (("weight", 1.0), ("density", DENSITY), ("gamma", 0.01))),
    "della": BenchMethod(True, (("weight", 1.0), ("density", DENSITY), ("epsilon", 0.1))),
    "della_linear": BenchMethod(True, (("weight", 1.0), ("density", DENSITY), ("epsilon", 0.1))),
    "slerp": BenchMethod(True, (), (("t", 0.5),), max_models=1),
    "model_stock": BenchMethod(True),
    "sce": BenchMethod(True, (), (("select_topk", DENSITY),)),  # the selection's fraction, as the others' density
    "nuslerp": BenchMethod(False, (("weight", 1.0),), max_models=2),
    "multislerp": BenchMethod(False, (("weight", 1.0),)),
    "karcher": BenchMethod(False),
    "nearswap": BenchMethod(True, (), (("t", 0.5),), max_models=1),
    "arcee_fusion": BenchMethod(True, max_models=1),
    "ram": BenchMethod(True),
    "ramplus_tl": BenchMethod(True),
    "passthrough": BenchMethod(False, max_models=1),
}


def available_methods() -> tuple[str, ...]:
    """The benchmarked methods dtm has (in this order)."""
    from dtm_fast.merge.methods import METHODS as REGISTERED

    return tuple(name for name in BENCH_METHODS if name in REGISTERED)


METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")  # the default selection: issue 3's four
SEED = 0
FLOOR_BUFFER_BYTES = 64 << 20


@dataclass
class Run:
    wall_s: float
    peak_rss_bytes: int


GNU_TIME = "/usr/bin/time"


def run_measured(command: list[str], log_path: Path) -> Run:
    """Run `command`, its output into log_path; wall time and the command's peak RSS.

    The peak comes from GNU time, which launches the command itself: a process forked from this
    (large) Python interpreter would inherit its memory high-water mark, since Linux carries
    ru_maxrss across exec. Without GNU time, os.wait4's figure is used and may include it."""
    rss_path = log_path.with_suffix(".rss")
    use_time = os.access(GNU_TIME, os.X_OK)
    launched = [GNU_TIME, "-f", "%M", "-o", str(rss_path), *command] if use_time else command
    with open(log_path, "w") as log_file:
        start = time.perf_counter()
        process = subprocess.Popen(launched, stdout=log_file, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, HF_HUB_OFFLINE="1"))
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise DtmError(f"`{' '.join(command)}` failed with exit code {process.returncode}; "
                       f"its output is in {log_path}:\n{tail}")
    peak_kib = int(rss_path.read_text().split()[-1]) if use_time else usage.ru_maxrss  # Linux: KiB
    return Run(wall, peak_kib * 1024)


def interpreter_baseline(log_path: Path) -> int:
    """Peak RSS of a Python process that only imports what a native (cpu) merge imports: what such a
    merge pays before working. (Merges on the reference backend also import torch, ~250 MB more.)"""
    command = [sys.executable, "-c", "import dtm_fast.merge.engine, dtm_fast.merge.stream, dtm_fast.merge.backends.cpu"]
    return run_measured(command, log_path).peak_rss_bytes


def read_files_s(paths: list[Path], buffer: bytearray) -> float:
    """Seconds to read every byte of `paths` into one reused buffer (from the page cache when warm)."""
    view = memoryview(buffer)
    start = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as file:
            while file.readinto(view):
                pass
    return time.perf_counter() - start


def write_bytes_s(path: Path, count: int, buffer: bytearray, durable: bool = False) -> float:
    """Seconds to write `count` bytes to a new file (into the page cache, as the merges do; with
    `durable`, then fsynced, as publishing an output is), then delete it."""
    view = memoryview(buffer)
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as file:
        remaining = count
        while remaining:
            remaining -= file.write(view[:min(remaining, len(view))])
        if durable:
            os.fsync(file.fileno())
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def model_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


def merged_models(method: str, models: list[Path]) -> list[Path]:
    limit = BENCH_METHODS[method].max_models
    return models[:limit] if limit else models


def mergekit_config(method: str, base: Path, models: list[Path]) -> dict:
    """The benchmarked merge in mergekit's YAML schema: what both tools run."""
    spec = BENCH_METHODS[method]
    config: dict = {"merge_method": method, "dtype": "bfloat16",
                    "models": [{"model": str(path), **({"parameters": dict(spec.per_model)} if spec.per_model else {})}
                               for path in merged_models(method, models)]}
    if spec.base:
        config["base_model"] = str(base)
    if spec.shared:
        config["parameters"] = dict(spec.shared)
    return config


def write_config(method: str, base: Path, models: list[Path], config_dir: Path) -> Path:
    path = config_dir / f"merge-{method}.yml"
    path.write_text(json.dumps(mergekit_config(method, base, models), indent=1))  # JSON is valid YAML
    return path


def dtm_command(config: Path, output: Path, backend: str | None, max_memory: str | None) -> list[str]:
    """`dtm merge CONFIG OUT` as a user runs it: the YAML, the default backend unless one is asked."""
    command = [sys.executable, "-m", "dtm_fast.cli", "merge", str(config), str(output), "--quiet", "--seed", str(SEED)]
    if backend:
        command += ["--backend", backend]
    if max_memory:
        command += ["--max-memory", max_memory]
    return command


def mergekit_command(config: Path, output: Path) -> list[str] | None:
    """The mergekit-yaml command for this config, or None when mergekit is not installed."""
    executable = shutil.which("mergekit-yaml") or str(Path(sys.executable).with_name("mergekit-yaml"))
    if not Path(executable).is_file():
        return None
    return [executable, str(config), str(output), "--no-copy-tokenizer", "--quiet", "--random-seed", str(SEED)]


def mergekit_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("mergekit")
    except Exception:  # noqa: BLE001 - any failure means "not installed" here
        return None


def default_backends() -> list[str]:
    """cpu and reference, and triton first where a GPU and triton are usable."""
    from dtm_fast.merge.backends.devices import gpu_may_be_present

    backends = ["cpu", "reference"]
    if gpu_may_be_present():
        from dtm_fast.merge.backends import triton_backend

        if triton_backend.unavailable_reason() is None:
            backends.insert(0, "triton")
    return backends
