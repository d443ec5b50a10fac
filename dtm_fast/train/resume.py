"""Which checkpoint a run continues, decided before the model is loaded.

A rerun of the same configuration continues from its newest checkpoint by itself: every checkpoint
records the run's identity (the settings that decide the weights, the model files' sizes and
modification times, the data files' SHA-256), and one whose identity equals this run's is resumed.
One that differs is refused with what differs and the three ways on (rerun with the recorded
settings, `--fresh` to delete the checkpoints and start over, or another `checkpoint_dir`); it is
never deleted unasked. `resume: true` additionally requires a checkpoint to exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dtm_fast.errors import DtmError
from dtm_fast.io.hashing import file_identity, path_sha256
from dtm_fast.train.checkpoint import complete_checkpoints, verify_checkpoint
from dtm_fast.train.config import TrainConfig
from dtm_fast.train.manifest import model_files


def run_identity(config: TrainConfig) -> dict[str, Any]:
    """What a checkpoint must have been trained with to be continued by this run. Data files are
    hashed (a portion rewritten in place keeps its size); model files, often many GB, by size and
    modification time."""
    model_dir = Path(config.model)
    files = {}
    for path in model_files(model_dir, config.gguf_file):
        identity = file_identity(path)
        files[path.name] = {"size": identity["size"], "mtime_ns": identity["mtime_ns"]}
    return {"settings": config.training_settings(), "model_files": files,
            "data_sha256": [path_sha256(Path(item)) for item in config.data]}


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def describe_difference(recorded: Any, current: dict[str, Any], data: tuple[str, ...]) -> str:
    """What differs between a checkpoint's identity and this run's, in words ('' when nothing)."""
    if not isinstance(recorded, dict):
        return "no readable record of its settings"
    changes = []
    old_settings = recorded.get("settings") if isinstance(recorded.get("settings"), dict) else {}
    for key, value in current["settings"].items():
        if old_settings.get(key, "<unset>") != value:
            changes.append(f"{key} {_shown(old_settings.get(key, '<unset>'))} -> {_shown(value)}")
    old_data = recorded.get("data_sha256")
    if not isinstance(old_data, list) or len(old_data) != len(current["data_sha256"]):
        changes.append(f"{len(old_data) if isinstance(old_data, list) else '?'} data file(s) -> {len(data)}")
    else:
        changes += [f"data {data[i]} has other content" for i, (a, b) in
                    enumerate(zip(old_data, current["data_sha256"])) if a != b]
    old_files = recorded.get("model_files") if isinstance(recorded.get("model_files"), dict) else {}
    for name in sorted(set(old_files) | set(current["model_files"])):
        if old_files.get(name) != current["model_files"].get(name):
            state = ("is new" if name not in old_files else "is gone" if name not in current["model_files"]
                     else "changed (size or modification time)")
            changes.append(f"model file {name} {state}")
    if len(changes) > 4:
        changes = changes[:4] + [f"{len(changes) - 4} more"]
    return "; ".join(changes)


def choose_checkpoint(config: TrainConfig, identity: dict[str, Any]) -> tuple[int, Path] | None:
    """(step, directory) of the checkpoint this run continues, or None to start at step 0.
    With `fresh` the caller deletes the checkpoints instead of asking."""
    directory = config.checkpoints_path
    if config.fresh:
        return None
    checkpoints = complete_checkpoints(directory)
    if not checkpoints:
        if config.resume:
            raise DtmError(f"resume: no complete checkpoint in {directory}; run without resume to start fresh")
        return None
    step, path = checkpoints[-1]
    state = verify_checkpoint(path)
    difference = describe_difference(state["identity"], identity, config.data)
    if difference:
        raise DtmError(f"{directory} holds checkpoints (newest: step {step}) of a run with other settings or inputs: "
                       f"{difference}. Rerun with the settings they were written with to continue them, pass --fresh "
                       "to delete them and start over, or set checkpoint_dir to another directory")
    return step, path
