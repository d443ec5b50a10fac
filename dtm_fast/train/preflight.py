"""What `dtm train` checks before it loads anything: that the inputs can be trained from, that the
output and checkpoint directories can neither destroy an input nor anything a user put there, and
that both locations can be written. Every refusal is one line naming the path and the way out.

The deletion rule is `dtm_fast.io.owned_dir`'s: an output may not be, contain or lie inside the
model, a data file or the checkpoint directory; a non-empty output that is not an earlier `dtm
train` output needs `overwrite`, and even then only files dtm recorded writing are replaced.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dtm_fast.errors import DtmError
from dtm_fast.io.owned_dir import check_replaceable, check_separate
from dtm_fast.train.config import TrainConfig
from dtm_fast.train.model import check_model_dir

TOOL = "dtm train"


def check_writable(path: Path, role: str, beside: bool = False) -> None:
    """`path` (which need not exist yet) can be created and written, and with `beside` so can a
    sibling of it: the nearest existing ancestor is a directory that takes a new entry (tried with a
    probe directory, removed at once: permission bits do not say what a read-only mount or a
    root-squashed share refuses)."""
    ancestor = Path(os.path.abspath(path))
    if beside:
        ancestor = ancestor.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise DtmError(f"{role} {path}: {ancestor} is a file, not a directory; choose another {role}")
    try:
        probe = tempfile.mkdtemp(prefix=".dtm-write-probe-", dir=ancestor)
    except OSError as error:
        raise DtmError(f"{role} {path}: cannot write in {ancestor} ({error.strerror}); choose another {role} or fix "
                       "its permissions") from None
    os.rmdir(probe)


def check_inputs_and_outputs(config: TrainConfig) -> None:
    """Every check that needs no model, no data parsing and no process group."""
    config.require_paths()
    model_dir = check_model_dir(config)
    output = Path(config.output_dir)
    checkpoints = config.checkpoints_path
    data = [("data file", Path(item)) for item in config.data]
    for _, item in data:
        if not item.exists():
            raise DtmError(f"data: {item}: no such file")
    check_separate(output, [("model directory", model_dir), *data, ("checkpoint directory", checkpoints)])
    check_separate(checkpoints, [("model directory", model_dir), *data])
    check_replaceable(output, TOOL, overwrite=config.overwrite, replace_own=True)
    check_writable(output, "output_dir", beside=True)  # the export is staged beside the output
    check_writable(checkpoints, "checkpoint_dir")
