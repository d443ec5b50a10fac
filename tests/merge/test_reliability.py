"""Issue 8 for merges: a changed input is never resumed into a published output, provenance tells
inputs apart, non-finite values are counted and reported (refused with --strict), a full disk keeps
the partial output for --resume, and bad parameters and paths are one-line errors."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_state, write_safetensors
from dtm_fast.cli import main as dtm


def error_lines(err: str) -> list[str]:
    """What the command said besides its progress lines."""
    return [line for line in err.strip().splitlines() if not line.startswith("[")]


def strict_json(path: Path):
    def refuse(name):
        raise ValueError(f"{path} holds {name}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture
def family(tmp_path):
    """A base and two models with identical headers (same names, shapes, dtypes) but other weights."""
    generator = torch.Generator().manual_seed(3)
    shapes = {f"layers.{i}.weight": (48, 33) for i in range(6)}
    base = {n: torch.randn(s, generator=generator) for n, s in shapes.items()}
    paths = [write_safetensors(tmp_path / "base" / "model.safetensors", base).parent]
    for index in range(2):
        model = {n: v + 0.1 * torch.randn(v.shape, generator=generator) for n, v in base.items()}
        paths.append(write_safetensors(tmp_path / f"m{index}" / "model.safetensors", model).parent)
    return paths


def ties_args(paths, out: Path, *extra: str) -> list[str]:
    base, m0, m1 = paths
    return ["merge", "--method", "ties", "--base", str(base), str(m0), str(m1), "--density", "0.5", "-o", str(out),
            "--max-shard-size", "8KB", "--quiet", *extra]


def interrupt_after_shards(paths, out: Path, shards: int, *extra: str) -> Path:
    """Run the merge in a child process that dies (os._exit) after `shards` shards are complete."""
    script = (
        "import os, sys\n"
        "import dtm_fast.io.output as output\n"
        "done = []\n"
        "original = output.finish_shard\n"
        "def finish(*args):\n"
        "    original(*args)\n"
        "    done.append(1)\n"
        f"    if len(done) == {shards}:\n"
        "        os._exit(9)\n"
        "output.finish_shard = finish\n"
        "from dtm_fast.cli import main\n"
        f"sys.exit(main({ties_args(paths, out, *extra)!r}))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 9, result.stderr
    partial = out.with_name(out.name + ".dtm-partial")
    assert len(list(partial.glob(".done-*"))) == shards
    return partial


def rewrite_in_place(path: Path, scale: float, keep_mtime: bool = False) -> None:
    """New weights under the same header, written into the same file (same inode and size)."""
    file = path / "model.safetensors"
    before = os.stat(file)
    state = load_state(path)
    write_safetensors(file.with_suffix(".new"), {n: v * scale for n, v in state.items()})
    data = file.with_suffix(".new").read_bytes()
    file.with_suffix(".new").unlink()
    with open(file, "r+b") as handle:
        handle.write(data)
    assert os.stat(file).st_ino == before.st_ino and os.stat(file).st_size == before.st_size
    if keep_mtime:
        os.utime(file, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_resume_refuses_an_input_rewritten_in_place_and_names_it(family, tmp_path, capsys):
    out = tmp_path / "out"
    partial = interrupt_after_shards(family, out, 2)
    rewrite_in_place(family[1], 1.5)
    assert dtm(ties_args(family, out, "--resume")) == 1
    error = capsys.readouterr().err
    assert str((family[1] / "model.safetensors").resolve()) in error and "changed" in error
    assert "modification time" in error and str(partial) in error
    assert partial.is_dir() and not out.exists()  # nothing published, nothing deleted


def test_verify_inputs_catches_a_change_that_kept_size_inode_and_mtime(family, tmp_path, capsys):
    out = tmp_path / "out"
    interrupt_after_shards(family, out, 2, "--verify-inputs")
    rewrite_in_place(family[2], 0.5, keep_mtime=True)
    assert dtm(ties_args(family, out, "--resume", "--verify-inputs")) == 1
    assert "its content differs" in capsys.readouterr().err


def test_resume_of_unchanged_inputs_equals_a_fresh_merge(family, tmp_path):
    fresh = tmp_path / "fresh"
    assert dtm(ties_args(family, fresh)) == 0
    out = tmp_path / "out"
    interrupt_after_shards(family, out, 3)
    assert dtm(ties_args(family, out, "--resume")) == 0
    for shard in sorted(fresh.glob("*.safetensors")):
        assert shard.read_bytes() == (out / shard.name).read_bytes()


def test_provenance_tells_inputs_with_equal_headers_apart(family, tmp_path):
    out = tmp_path / "out"
    assert dtm(ties_args(family, out, "--verify-inputs")) == 0
    record = strict_json(out / "dtm_merge.json")
    first, second = record["models"]
    assert first["header_sha256"] == second["header_sha256"]  # the case a header hash cannot tell apart
    assert first["files"][0]["sha256"] != second["files"][0]["sha256"]
    assert (first["files"][0]["inode"], first["files"][0]["path"]) != (second["files"][0]["inode"],
                                                                       second["files"][0]["path"])
    assert record["nonfinite_inputs"] == []


@pytest.fixture
def poisoned(tmp_path):
    a = {"w": torch.ones(64, 8), "v": torch.zeros(8)}
    b = {"w": torch.ones(64, 8), "v": torch.ones(8)}
    b["w"][3, 1] = float("nan")
    b["w"][5, 0] = float("inf")
    b["v"][2] = float("-inf")
    return (write_safetensors(tmp_path / "a" / "model.safetensors", a).parent,
            write_safetensors(tmp_path / "b" / "model.safetensors", b).parent)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_non_finite_inputs_are_counted_reported_and_recorded(poisoned, tmp_path, capsys, backend):
    a, b = poisoned
    out = tmp_path / "out"
    assert dtm(["merge", str(a), str(b), "-o", str(out), "--backend", backend, "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "3 NaN or infinite value(s)" in err and "w in" in err and "--strict" in err
    counts = {(r["tensor"], Path(r["file"]).parent.name): r["count"] for r in strict_json(out / "dtm_merge.json")["nonfinite_inputs"]}
    assert counts == {("w", "b"): 2, ("v", "b"): 1}


def test_strict_refuses_non_finite_inputs_and_keeps_the_partial_output(poisoned, tmp_path, capsys):
    a, b = poisoned
    out = tmp_path / "out"
    assert dtm(["merge", str(a), str(b), "-o", str(out), "--strict", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and "NaN or infinite" in err and "--strict" in err
    assert not out.exists()


@pytest.mark.parametrize("argv, expected", [
    (["--weights", "nan", "1"], "finite"),
    (["--weights", "1", "inf"], "finite"),
    (["--method", "task_arithmetic", "--lambda", "nan"], "finite"),
    (["--max-memory", "inf"], "--max-memory"),
    (["--max-memory", "nanGiB"], "--max-memory"),
    (["--param", "normalize=[1,"], "--param"),
    (["--param", "normalize={a: 1}"], "mapping"),
    (["--method", "ties", "--param", "density=[{filter: mlp}]"], "needs 'value'"),
])
def test_bad_parameters_are_one_line_errors(poisoned, tmp_path, capsys, argv, expected):
    a, b = poisoned
    base = ["--base", str(a)] if "task_arithmetic" in argv or "ties" in argv else []
    assert dtm(["merge", str(a), str(b), "-o", str(tmp_path / "out"), *base, *argv, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err and len(error_lines(err)) == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.dtm-partial").exists()


def test_output_paths_that_cannot_be_a_directory_are_refused(poisoned, tmp_path, capsys):
    a, b = poisoned
    (tmp_path / "file").write_text("mine")
    for output, expected in ((tmp_path / "file", "not a directory"), (tmp_path / "file" / "out", "is a file")):
        assert dtm(["merge", str(a), str(b), "-o", str(output), "--overwrite", "--quiet"]) == 1
        assert expected in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "mine"


def test_overwrite_removes_only_what_dtm_wrote(poisoned, tmp_path):
    a, b = poisoned
    out = tmp_path / "out"
    assert dtm(["merge", str(a), str(b), "-o", str(out), "--quiet"]) == 0
    (out / "notes.txt").write_text("my notes")
    assert dtm(["merge", str(a), str(b), "-o", str(out), "--weights", "3", "1", "--overwrite", "--quiet"]) == 0
    assert (out / "notes.txt").read_text() == "my notes"
    expected = torch.full((8,), 0.25)
    expected[2] = float("-inf")  # b's -inf, weighted
    assert torch.equal(load_state(out)["v"], expected)


def test_a_full_disk_keeps_the_partial_output_and_resume_finishes_it(family, tmp_path, capsys, monkeypatch):
    import dtm_fast.merge.stream as stream

    fresh = tmp_path / "fresh"
    assert dtm(ties_args(family, fresh)) == 0
    capsys.readouterr()
    writes = []
    original = stream.write_exact

    def fill_up(fd, buffer, offset):
        writes.append(1)
        if len(writes) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        original(fd, buffer, offset)

    monkeypatch.setattr(stream, "write_exact", fill_up)
    out = tmp_path / "out"
    assert dtm(ties_args(family, out)) == 1
    err = capsys.readouterr().err
    assert "full" in err and "--resume" in err and "Traceback" not in err and len(error_lines(err)) == 1
    assert (tmp_path / "out.dtm-partial").is_dir() and not out.exists()
    monkeypatch.setattr(stream, "write_exact", original)
    assert dtm(ties_args(family, out, "--resume")) == 0
    for shard in sorted(fresh.glob("*.safetensors")):
        assert shard.read_bytes() == (out / shard.name).read_bytes()


@pytest.fixture
def small_filesystem(tmp_path):
    """A 24 KiB tmpfs (needs root and mount; skipped where the machine does not allow it)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24k", "tmpfs", str(mount_point)],
                            capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {result.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def test_a_real_full_disk_is_a_clear_error_and_the_partial_output_is_kept(family, small_filesystem, capsys,
                                                                          monkeypatch):
    import shutil as shutil_module

    real_usage = shutil_module.disk_usage
    # the free-space check would refuse up front; pretend there is room so the disk fills mid-merge
    monkeypatch.setattr("dtm_fast.io.output.shutil.disk_usage",
                        lambda path: real_usage(path)._replace(free=1 << 40))
    out = small_filesystem / "out"
    big = [family[0], family[1], family[2]]
    assert dtm(ties_args(big, out, "--max-shard-size", "4KB")) == 1
    err = capsys.readouterr().err
    assert "full" in err and "--resume" in err and len(error_lines(err)) == 1, err
    assert (small_filesystem / "out.dtm-partial").is_dir()


def test_read_only_location_is_refused_before_work(poisoned, tmp_path, capsys):
    a, b = poisoned
    target = tmp_path / "ro"
    target.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(target)], capture_output=True)
    if result.returncode != 0:
        pytest.skip("cannot mount a read-only filesystem here")
    try:
        assert dtm(["merge", str(a), str(b), "-o", str(target / "out"), "--quiet"]) == 1
        assert "not writable" in capsys.readouterr().err
    finally:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_resume_free_space_counts_what_the_partial_output_holds(tmp_path):
    from dtm_fast.io import output as out_io

    written = tmp_path / "written.safetensors"
    written.write_bytes(b"\1" * 65536)
    sparse = tmp_path / "sparse.safetensors"
    with open(sparse, "wb") as handle:
        handle.truncate(65536)
    assert out_io.reclaimable_bytes(tmp_path, ["written.safetensors"]) >= 65536
    assert out_io.reclaimable_bytes(tmp_path, ["sparse.safetensors", "missing.safetensors"]) < 65536
