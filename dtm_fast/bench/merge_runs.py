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

METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")
DENSITY = 0.5
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


def write_bytes_s(path: Path, count: int, buffer: bytearray) -> float:
    """Seconds to write `count` bytes to a new file (into the page cache, as the merges do), then delete it."""
    view = memoryview(buffer)
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as file:
        remaining = count
        while remaining:
            remaining -= file.write(view[:min(remaining, len(view))])
    elapsed = time.perf_counter() - start
    path.unlink()
    return elapsed


def model_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


def dtm_command(method: str, backend: str, base: Path, models: list[Path], output: Path,
                max_memory: str | None) -> list[str]:
    command = [sys.executable, "-m", "dtm_fast.cli", "merge", "--method", method, "--backend", backend,
               "--seed", str(SEED), "--quiet", "-o", str(output)]
    if method != "linear":
        command += ["--base", str(base)]
    if method in ("ties", "dare_ties"):
        command += ["--density", str(DENSITY), "--normalize"]
    elif method == "task_arithmetic":
        command += ["--no-normalize"]
    if max_memory:
        command += ["--max-memory", max_memory]
    return command + [str(path) for path in models]


def mergekit_config(method: str, base: Path, models: list[Path]) -> dict:
    """The same merge as dtm_command's, in mergekit's YAML schema."""
    parameters: dict = {"weight": 1.0}
    if method in ("ties", "dare_ties"):
        parameters["density"] = DENSITY
    config: dict = {"merge_method": method, "dtype": "bfloat16",
                    "models": [{"model": str(path), "parameters": dict(parameters)} for path in models]}
    if method != "linear":
        config["base_model"] = str(base)
        config["parameters"] = {"normalize": method in ("ties", "dare_ties")}
    return config


def mergekit_command(method: str, base: Path, models: list[Path], output: Path, config_dir: Path) -> list[str] | None:
    """The mergekit-yaml command for this merge, or None when mergekit is not installed."""
    executable = shutil.which("mergekit-yaml") or str(Path(sys.executable).with_name("mergekit-yaml"))
    if not Path(executable).is_file():
        return None
    config_path = config_dir / f"mergekit-{method}.yml"
    # JSON is valid YAML, so no YAML writer is needed
    config_path.write_text(json.dumps(mergekit_config(method, base, models), indent=1))
    return [executable, str(config_path), str(output), "--no-copy-tokenizer", "--quiet",
            "--random-seed", str(SEED)]


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
