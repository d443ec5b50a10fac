"""Training checkpoints in files that cannot run code: safetensors for tensors, JSON for the rest.

    step-00000040/
        rank-00000-of-00002.safetensors   this rank's rows of every trainable parameter and of its
        rank-00001-of-00002.safetensors   AdamW state, its torch (and CUDA) RNG state; the header's
                                          metadata holds the rows it covers and its Python RNG state
        trainer.json                      step, world size, scheduler, learning rates, the run's
                                          identity (settings, model files, data hashes); written last

torch.distributed.checkpoint is not used on purpose: its file reader unpickles the `.metadata` file,
and its default planner unpickles non-tensor entries with weights-only mode off, so a crafted
checkpoint would run code on resume. Here every file is parsed as JSON or as raw tensor bytes.

Each rank writes its own file (no gather); a checkpoint is `step-N.tmp` until every rank has
written and fsynced, then rank 0 writes trainer.json and renames it to `step-N`, so a crash at any
moment leaves the previous checkpoint complete. Resuming reads each tensor's rows from whichever
rank files hold them, so a checkpoint written by N ranks resumes on M. Frozen parameters (the base
model under LoRA) are never saved: they are reloaded from the base.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from pathlib import Path
from typing import Any

from dtm_fast.errors import DtmError
from dtm_fast.io.atomic import fsync_directory, write_json
from dtm_fast.io.safetensors_format import read_header
from dtm_fast.train.parallel import Runtime, barrier
from dtm_fast.train.tensor_rows import RowReader, RowSource, local_rows, write_tensor_file

logger = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step-(\d{8})$")
PARTIAL_DIR = re.compile(r"^step-(\d{8})\.tmp$")
TRAINER_FILE = "trainer.json"
RANK_FILE = re.compile(r"^rank-(\d{5})-of-(\d{5})\.safetensors$")
FORMAT = "dtm_fast train checkpoint 2"


def rank_file_name(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.safetensors"


def complete_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / TRAINER_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _remove_written(step_dir: Path) -> None:
    """Delete the files a checkpoint of ours consists of, then the directory if nothing else is in it."""
    for child in step_dir.iterdir():
        if child.is_file() and (child.name == TRAINER_FILE or RANK_FILE.match(child.name)):
            child.unlink()
    if any(step_dir.iterdir()):
        logger.warning("kept %s: it holds files dtm train did not write", step_dir)
    else:
        step_dir.rmdir()


def remove_checkpoints(directory: Path) -> list[int]:
    """Delete every checkpoint (finished or partial) dtm train wrote in `directory`; returns the
    steps removed. Nothing else in the directory is touched."""
    removed = []
    if not Path(directory).is_dir():
        return removed
    for child in sorted(Path(directory).iterdir()):
        match = STEP_DIR.match(child.name) or PARTIAL_DIR.match(child.name)
        if match and child.is_dir():
            _remove_written(child)
            removed.append(int(match.group(1)))
    return removed


def read_trainer_state(step_dir: Path) -> dict[str, Any]:
    """trainer.json of a checkpoint, checked for the fields resuming needs."""
    path = step_dir / TRAINER_FILE
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise DtmError(f"{path}: not a dtm train checkpoint record ({type(error).__name__}: {error}); the checkpoint is "
                       f"damaged: delete {step_dir} to continue from an earlier one, or pass --fresh to start "
                       "over") from None
    required = {"format": str, "step": int, "world_size": int, "scheduler": dict, "param_groups": list, "identity": dict}
    if not isinstance(state, dict) or any(not isinstance(state.get(k), t) for k, t in required.items()):
        raise DtmError(f"{path}: lacks the fields of a dtm train checkpoint (format, step, world_size, scheduler, "
                       f"param_groups, identity); delete {step_dir} or pass --fresh to start over")
    if state["format"] != FORMAT:
        raise DtmError(f"{path}: checkpoint format {state['format']!r}, this version reads {FORMAT!r}; "
                       "pass --fresh to start over")
    return state


def verify_checkpoint(step_dir: Path) -> dict[str, Any]:
    """Read a checkpoint's record and every rank file's header (JSON only, no tensor data) so a
    damaged checkpoint is refused before the model is loaded; returns the record."""
    state = read_trainer_state(step_dir)
    _open_rank_files(step_dir)
    return state


# ---- what a rank saves ------------------------------------------------------------------------------
def _trainable(model: Any) -> list[tuple[str, Any]]:
    return [(name, param) for name, param in model.named_parameters() if param.requires_grad]


def _rank_tensors(model: Any, optimizer: Any, runtime: Runtime) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """(file key, local tensor) of this rank, and each key's rows: [first, count, full rows] or
    None for a whole (unsharded) tensor."""
    import torch

    tensors, rows = [], {}

    def add(key: str, tensor: Any) -> None:
        local, first = local_rows(tensor)
        tensors.append((key, local))
        rows[key] = None if tensor.dim() == 0 else [first, int(local.shape[0]), int(tensor.shape[0])]

    for name, param in _trainable(model):
        add(f"model/{name}", param.detach())
        for state_key, value in optimizer.state.get(param, {}).items():
            if not isinstance(value, torch.Tensor):
                raise DtmError(f"optimizer state {state_key!r} of {name} is not a tensor; cannot checkpoint it")
            add(f"optim/{name}/{state_key}", value)
    tensors.append(("rng/torch", torch.get_rng_state()))
    rows["rng/torch"] = None
    if runtime.device.type == "cuda":
        tensors.append(("rng/cuda", torch.cuda.get_rng_state(runtime.device)))
        rows["rng/cuda"] = None
    return tensors, rows


def _json_safe(value: Any) -> Any:
    """A scheduler or param-group value as JSON holds it (tuples become lists)."""
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise DtmError(f"cannot record a {type(value).__name__} in a checkpoint")


def save_checkpoint(directory: Path, step: int, model: Any, optimizer: Any, scheduler: Any, runtime: Runtime,
                    keep: int, identity: dict[str, Any]) -> Path:
    directory = Path(directory)
    final = directory / f"step-{step:08d}"
    partial = directory / f"step-{step:08d}.tmp"
    if runtime.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        if partial.exists():  # an interrupted save of this very step, by dtm
            _remove_written(partial)
        partial.mkdir(exist_ok=True)
    barrier(runtime)
    tensors, rows = _rank_tensors(model, optimizer, runtime)
    metadata = {"format": FORMAT, "rows": json.dumps(rows), "python_rng": json.dumps(random.getstate())}
    write_tensor_file(partial / rank_file_name(runtime.rank, runtime.world_size), tensors, metadata)
    barrier(runtime)
    if runtime.is_main:
        shapes = {key: list(tensor.shape) for key, tensor in _full_shapes(model, optimizer)}
        groups = [{key: _json_safe(value) for key, value in group.items() if key != "params"}
                  for group in optimizer.param_groups]
        write_json(partial / TRAINER_FILE, {
            "format": FORMAT, "step": step, "world_size": runtime.world_size, "identity": identity,
            "scheduler": _json_safe(scheduler.state_dict()), "param_groups": groups, "shapes": shapes})
        fsync_directory(partial)
        if final.exists():
            _remove_written(final)
        partial.rename(final)
        fsync_directory(directory)
        for _, old in complete_checkpoints(directory)[:-keep]:
            _remove_written(old)
        logger.info("checkpoint saved: %s", final)
    barrier(runtime)
    return final


def _full_shapes(model: Any, optimizer: Any) -> list[tuple[str, Any]]:
    shapes = []
    for name, param in _trainable(model):
        shapes.append((f"model/{name}", param))
        for state_key, value in optimizer.state.get(param, {}).items():
            shapes.append((f"optim/{name}/{state_key}", value))
    return shapes


# ---- resuming -----------------------------------------------------------------------------------------
def _open_rank_files(step_dir: Path) -> tuple[dict[str, list[RowSource]], dict[int, dict[str, Any]]]:
    """Every tensor key -> the rank files' pieces of it; and per rank, its saved RNG states."""
    sources: dict[str, list[RowSource]] = {}
    rng: dict[int, dict[str, Any]] = {}
    files = sorted(p for p in step_dir.iterdir() if RANK_FILE.match(p.name))
    if not files:
        raise DtmError(f"{step_dir}: holds no rank-*.safetensors files; the checkpoint is damaged: delete it "
                       "or pass --fresh to start over")
    for path in files:
        header = read_header(path)  # JSON only; a pickle or any other content is refused here
        rank = int(RANK_FILE.match(path.name).group(1))
        try:
            rows = json.loads(header.metadata["rows"])
            python_rng = json.loads(header.metadata["python_rng"])
        except (KeyError, json.JSONDecodeError, RecursionError):
            raise DtmError(f"{path}: lacks the rows and RNG records of a dtm train checkpoint; delete {step_dir} "
                           "or pass --fresh to start over") from None
        rng[rank] = {"python": python_rng}
        for key, entry in header.tensors.items():
            if key.startswith("rng/"):
                rng[rank][key] = entry
                continue
            placement = rows.get(key) if isinstance(rows, dict) else None
            first = placement[0] if isinstance(placement, list) and placement and isinstance(placement[0], int) else 0
            sources.setdefault(key, []).append(RowSource(entry, first))
    return sources, rng


def _fill(reader: RowReader, key: str, tensor: Any, sources: dict[str, list[RowSource]], step_dir: Path) -> None:
    import torch

    if key not in sources:
        raise DtmError(f"{step_dir}: holds no {key!r}; the checkpoint is of another model or fine-tuning method: "
                       "resume with the config it was written with, or pass --fresh to start over")
    local, first = local_rows(tensor)
    with torch.no_grad():
        reader.fill(local, first, sources[key], f"{step_dir}: {key}")


def _load_scheduler(scheduler: Any, saved: dict[str, Any], step_dir: Path) -> None:
    """Only the scheduler's own keys, each of the type it has now: a record cannot set anything else
    (the learning-rate function itself is this run's, never the record's)."""
    def same_kind(old: Any, new: Any) -> bool:
        if isinstance(old, bool) or isinstance(new, bool):
            return type(old) is type(new)
        if isinstance(old, (int, float)):
            return isinstance(new, (int, float))
        if isinstance(old, (list, tuple)):
            return isinstance(new, list) and len(new) == len(old) and all(map(same_kind, old, new))
        return old is None or type(old) is type(new)

    current = scheduler.state_dict()
    restored = {}
    for key, value in current.items():
        if key == "lr_lambdas":
            restored[key] = value
        elif key in saved and same_kind(value, saved[key]):
            restored[key] = saved[key]
        else:
            raise DtmError(f"{step_dir}: the recorded scheduler state lacks or mistypes {key!r}; resume with the "
                           "version that wrote it, or pass --fresh to start over")
    scheduler.load_state_dict(restored)


def load_checkpoint(step_dir: Path, model: Any, optimizer: Any, scheduler: Any, runtime: Runtime) -> int:
    """Restore the checkpoint in `step_dir` into the built model, optimizer and scheduler;
    returns the number of steps it had finished."""
    import torch

    state = read_trainer_state(step_dir)
    sources, rng = _open_rank_files(step_dir)
    trainable = _trainable(model)
    with RowReader() as reader:
        for name, param in trainable:
            _fill(reader, f"model/{name}", param, sources, step_dir)
        groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        for name, param in trainable:
            prefix = f"optim/{name}/"
            keys = sorted(key[len(prefix):] for key in sources if key.startswith(prefix))
            group = groups[id(param)]
            on_device = group.get("fused") or group.get("capturable")
            for state_key in keys:
                entry = sources[prefix + state_key][0].entry
                if entry.shape == () or state_key == "step":
                    value = torch.zeros((), dtype=torch.float32, device=param.device if on_device else "cpu")
                else:
                    value = torch.zeros_like(param, memory_format=torch.preserve_format)
                _fill(reader, prefix + state_key, value, sources, step_dir)
                optimizer.state[param][state_key] = value
        saved_groups = state["param_groups"]
        if len(saved_groups) != len(optimizer.param_groups):
            raise DtmError(f"{step_dir}: was written with {len(saved_groups)} optimizer parameter group(s), this run "
                           f"has {len(optimizer.param_groups)}; resume with the version that wrote it, or --fresh")
        for group, saved in zip(optimizer.param_groups, saved_groups):
            for key in ("lr", "initial_lr"):
                value = saved.get(key) if isinstance(saved, dict) else None
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    raise DtmError(f"{step_dir}: the recorded learning rate ({key}) is missing or not a finite "
                                   "number; the checkpoint is damaged: delete it or pass --fresh to start over")
                group[key] = float(value)
        _load_scheduler(scheduler, state["scheduler"], step_dir)
        own = rng.get(runtime.rank) or rng[min(rng)]
        if state["world_size"] != runtime.world_size:
            logger.warning("checkpoint %s was written by %d ranks, this run has %d: the data order is the same, the "
                           "random streams (dropout) are not", step_dir, state["world_size"], runtime.world_size)
        try:
            version, internal, gauss = own["python"]
            random.setstate((version, tuple(internal), gauss))
        except (TypeError, ValueError):
            raise DtmError(f"{step_dir}: the recorded Python random state is damaged; delete the checkpoint or pass "
                           "--fresh to start over") from None
        generator_state = torch.empty(own["rng/torch"].shape, dtype=torch.uint8)
        reader.fill(generator_state, 0, [RowSource(own["rng/torch"])], f"{step_dir}: rng/torch")
        torch.set_rng_state(generator_state)
        if runtime.device.type == "cuda" and "rng/cuda" in own:
            cuda_state = torch.empty(own["rng/cuda"].shape, dtype=torch.uint8)
            reader.fill(cuda_state, 0, [RowSource(own["rng/cuda"])], f"{step_dir}: rng/cuda")
            torch.cuda.set_rng_state(cuda_state, runtime.device)
    barrier(runtime)
    return int(state["step"])
