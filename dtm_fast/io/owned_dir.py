"""Output directories and what dtm may delete in them.

The rule every command follows: nothing dtm did not write is ever deleted. Each output directory a
command publishes records the files it wrote in `.dtm-written.json` ({"tool": ..., "files": [...]}).
Replacing an earlier output removes exactly those files; anything else a user put in the directory
stays. An output may never be, contain or lie inside one of the command's inputs.

    check_separate(output, [("model", model_dir), ("data", data_file.parent)])
    check_replaceable(output, "dtm train", overwrite=False, replace_own=True)   # before any work
    ... build the result in a staging directory beside the output ...
    publish(staging, output, "dtm train", marker="dtm_train.json")
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Iterable

from dtm_fast.errors import DtmError
from dtm_fast.io.atomic import fsync_directory, write_json

log = logging.getLogger(__name__)
OWNERSHIP_FILE = ".dtm-written.json"


def check_separate(output: Path, protected: Iterable[tuple[str, Path]]) -> None:
    """Refuse an output that is, contains, or is inside a protected path (an input of the command:
    a model, a data file's directory, a checkpoint to resume from). Symlinks are resolved, so a link
    that points at the user's model is caught too."""
    target = Path(output).resolve()
    for role, path in protected:
        source = Path(path).resolve()
        if target == source:
            relation = "is"
        elif source in target.parents:
            relation = "is inside"
        elif target in source.parents:
            relation = "contains"
        else:
            continue
        raise DtmError(f"output {output} {relation} the input {path} (the {role}); choose an output directory "
                       "outside every input (dtm never writes into its inputs)")


def written_files(directory: Path) -> tuple[str, list[str]] | None:
    """(tool, files) that dtm recorded writing into `directory`, or None when it holds no record."""
    record_path = Path(directory) / OWNERSHIP_FILE
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("files"), list):
        return None
    files = [f for f in record["files"] if isinstance(f, str) and _is_plain_relative(f)]
    return str(record.get("tool", "")), files


def _is_plain_relative(name: str) -> bool:
    """A recorded name must stay inside its directory (a crafted record must not point elsewhere)."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def _foreign_files(directory: Path) -> list[str]:
    """Files and directories in `directory` that dtm did not record writing, relative names."""
    record = written_files(directory)
    owned = set(record[1]) if record else set()
    owned.add(OWNERSHIP_FILE)
    foreign = []
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if path.is_dir() and not path.is_symlink():
            continue  # a directory is judged by what it holds
        if name not in owned:
            foreign.append(name)
    return foreign


def check_replaceable(output: Path, tool: str, overwrite: bool, replace_own: bool) -> None:
    """May `tool` publish at `output`? Called before any work starts.

    A missing or empty directory: yes. An earlier output of `tool` holding only what it wrote: yes
    when `replace_own` (a rerun replaces its own result) or `overwrite`. A directory holding files
    dtm did not write: only with `overwrite`, and even then those files stay."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise DtmError(f"output {output} exists and is not a directory; choose a directory path")
    if not output.exists():
        ancestor = output.absolute().parent
        while not ancestor.exists():
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise DtmError(f"output {output}: {ancestor} is a file, not a directory")
        if not os.access(ancestor, os.W_OK | os.X_OK):
            raise DtmError(f"output {output}: cannot create it, {ancestor} is not writable (read-only or "
                           "permission denied); choose another location")
        return
    if not os.access(output, os.W_OK | os.X_OK):
        raise DtmError(f"output {output} is not writable by this user; choose another output directory")
    if not any(output.iterdir()):
        return
    record = written_files(output)
    foreign = _foreign_files(output)
    if record is not None and record[0] == tool and not foreign:
        if replace_own or overwrite:
            return
        raise DtmError(f"{output} already exists and holds an output of {tool}; pass --overwrite to replace "
                       "it, or choose another output")
    if not overwrite:
        what = f"an output of {record[0]} and " if record else ""
        raise DtmError(f"{output} already exists and holds {what}{len(foreign)} file(s) that {tool} did not write "
                       f"(e.g. {foreign[0]}); choose a new or empty directory, or pass --overwrite to write "
                       "beside them (files dtm did not write are never deleted)")


def publish(staging: Path, output: Path, tool: str, marker: str | None = None, scratch: tuple[str, ...] = ()) -> None:
    """Move the complete `staging` directory (a sibling of `output`, same filesystem) into place
    and record its files as written by `tool`. `marker` is the file whose presence says the output
    is complete: it is moved last when files must be moved one by one.

    An absent or empty output, or one holding only files dtm wrote, is replaced by renames: a reader
    sees the old output or the new one. Next to files dtm did not write, the new files are moved in
    one by one (after the old output's own files are removed), and the ownership record always
    lists everything of dtm's that is in the directory, so an interruption leaves nothing orphaned.

    `scratch` are glob patterns of staging files that are not part of the output (resume markers):
    they stay in the staging directory until it has moved, so a kill at any moment leaves either a
    resumable staging directory or a complete output; then they are removed."""
    staging, output = Path(staging), Path(output)
    transient = {p.relative_to(staging).as_posix() for pattern in scratch for p in staging.glob(pattern)}
    staged = sorted(name for name in (p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
                    if name != OWNERSHIP_FILE and name not in transient)
    write_json(staging / OWNERSHIP_FILE, {"tool": tool, "files": staged})
    if not output.exists() or (output.is_dir() and not any(output.iterdir())):
        os.replace(staging, output)
        fsync_directory(output.parent)
        _remove_written(output, sorted(transient))
        return
    record = written_files(output)
    old_files = record[1] if record else []
    foreign = _foreign_files(output)
    if not foreign:
        retired = output.with_name(f".{output.name}.dtm-replaced-{os.getpid()}")
        os.replace(output, retired)
        os.replace(staging, output)
        fsync_directory(output.parent)
        _remove_written(output, sorted(transient))
        _remove_written(retired, [*old_files, OWNERSHIP_FILE])
        _remove_empty_tree(retired)
        return
    colliding = sorted(set(staged) & set(foreign))
    if colliding:
        raise DtmError(f"{output}: holds {colliding[0]!r}, which dtm did not write and the new output would "
                       "replace; move it away or choose another output directory")
    # the record covers old and new files while both may be present
    write_json(output / OWNERSHIP_FILE, {"tool": tool, "files": sorted(set(old_files) | set(staged))})
    _remove_written(output, [name for name in old_files if name not in staged] + ([marker] if marker else []))
    for name in sorted(staged, key=lambda n: n == marker):
        destination = output / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, destination)
    os.replace(staging / OWNERSHIP_FILE, output / OWNERSHIP_FILE)
    fsync_directory(output)
    _remove_written(staging, sorted(transient))
    _remove_empty_tree(staging)


def _remove_written(directory: Path, names: Iterable[str]) -> None:
    for name in names:
        if not _is_plain_relative(name):
            continue
        path = directory / name
        if path.is_file() or path.is_symlink():
            path.unlink()


def _remove_empty_tree(directory: Path) -> None:
    """Remove `directory` and its sub-directories if nothing is left in them; anything left (a
    file dtm did not record) stays, with a warning."""
    if not directory.is_dir():
        return
    for path in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    if any(directory.iterdir()):
        log.warning("left %s in place: it holds files dtm did not write", directory)
    else:
        directory.rmdir()
