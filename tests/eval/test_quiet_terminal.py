"""A quiet terminal: lm-evaluation-harness's and transformers' log lines and progress bars go to the
command's log file; the terminal gets dtm's own lines (the table, the sentence, the files written)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIBRARY_MARKS = ("Running loglikelihood requests", "lm_eval", "it/s]", "Building contexts", "transformers")


def test_library_output_goes_to_the_log_file(tiny_models, mmlu_file, tmp_path):
    output = tmp_path / "report"
    result = subprocess.run(
        [sys.executable, "-m", "dtm_fast.cli", "eval", "--base", str(tiny_models["base"]),
         "--merged", str(tiny_models["merged"]), "--task", f"mmlu={mmlu_file}", "--limit", "3", "-o", str(output),
         "--quiet"], capture_output=True, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    terminal = result.stdout + result.stderr
    assert "alignment tax (difference to base)" in result.stdout
    for mark in LIBRARY_MARKS:
        assert mark not in terminal, (mark, terminal)
    log = (output / "dtm-eval.log").read_text()
    assert "Running loglikelihood requests" in log or "Building contexts" in log, log[:2000]


def test_dtm_warnings_still_reach_the_terminal(tmp_path, capsys):
    import logging

    from dtm_fast import ui

    ui.configure(quiet=True)
    (tmp_path / "logs").mkdir()
    with ui.library_output_to(tmp_path / "logs" / "x.log"):
        logging.getLogger("transformers.modeling_utils").warning("a library warning")
        logging.getLogger("dtm_fast.disperse").warning("field packs unevenly")
        print("a library print")
        ui.info("our own line")
    captured = capsys.readouterr()
    assert "our own line" in captured.err and "warning: field packs unevenly" in captured.err
    assert "a library" not in captured.out + captured.err
    log = (tmp_path / "logs" / "x.log").read_text()
    assert "a library warning" in log and "a library print" in log


def test_a_library_that_sets_up_logging_while_captured_keeps_working(tmp_path, capsys):
    """lm_eval and transformers add their handler on first import, which may happen inside a capture
    (then on the log file): after the capture closes, that handler must neither fail nor vanish."""
    import logging

    from dtm_fast import ui

    library = logging.getLogger("some_library_set_up_late")
    library.propagate = False
    with ui.library_output_to(tmp_path / "first.log"):
        library.addHandler(logging.StreamHandler(sys.stderr))  # sys.stderr is the log file here
        library.warning("inside")
    capsys.readouterr()
    library.warning("after")  # must not write to the closed log
    err = capsys.readouterr().err
    assert "Logging error" not in err and "after" in err, err
    with ui.library_output_to(tmp_path / "second.log"):
        library.warning("inside again")
    assert "inside" in (tmp_path / "first.log").read_text()
    assert "inside again" in (tmp_path / "second.log").read_text()
    library.handlers.clear()
