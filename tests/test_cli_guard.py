"""Every entry point ends in one line of error, never a traceback; a bug leaves its traceback in a
log file the message names, and --debug shows it instead."""

from __future__ import annotations

import errno
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dtm_fast import cli
from dtm_fast.errors import DtmError, Interrupted


@pytest.fixture
def command(monkeypatch, tmp_path):
    """`dtm merge` whose run() does what the test sets."""
    import dtm_fast.merge.cli as merge_cli

    monkeypatch.setenv("DTM_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.delenv("DTM_DEBUG", raising=False)
    behaviour = {}

    def fake_run(args):
        raise behaviour["raise"]

    monkeypatch.setattr(merge_cli, "run", fake_run)
    return behaviour


def test_a_bug_prints_one_line_and_keeps_the_traceback_in_a_log(command, capsys, tmp_path):
    command["raise"] = RuntimeError("something inside broke")
    assert cli.main(["merge", "a", "-o", "b"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "internal error: RuntimeError: something inside broke" in err
    log = Path(re.search(r"traceback is in (\S+)\.", err).group(1))
    assert log.parent == tmp_path / "logs"
    text = log.read_text()
    assert "Traceback" in text and "something inside broke" in text and "arguments: merge a -o b" in text


def test_debug_shows_the_traceback(command):
    command["raise"] = RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        cli.main(["merge", "a", "--debug"])


def test_user_errors_os_errors_and_interruptions_are_one_line(command, capsys):
    command["raise"] = DtmError("x.yml: field 'k' must be positive")
    assert cli.main(["merge"]) == 1
    assert capsys.readouterr().err == "dtm merge: error: x.yml: field 'k' must be positive\n"
    command["raise"] = OSError(errno.ENOSPC, "No space left on device", "/out/model.safetensors")
    assert cli.main(["merge"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("dtm merge: error: /out/model.safetensors: No space left on device; free some space")
    assert len(err.splitlines()) == 1
    command["raise"] = Interrupted("rerun the same command with --resume to continue")
    assert cli.main(["merge"]) == 130
    assert capsys.readouterr().err == "dtm merge: interrupted; rerun the same command with --resume to continue\n"


def test_the_real_command_line_never_shows_a_traceback(tmp_path):
    """Through the installed entry point: a directory given as a YAML config."""
    (tmp_path / "cfg.yml").mkdir()
    result = subprocess.run([sys.executable, "-m", "dtm_fast.cli", "merge", str(tmp_path / "cfg.yml"),
                             str(tmp_path / "out")], capture_output=True, text=True,
                            env={"DTM_LOG_DIR": str(tmp_path / "logs"), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
