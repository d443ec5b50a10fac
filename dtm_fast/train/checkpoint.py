"""Training checkpoints with torch.distributed.checkpoint: model and optimizer (each rank writes its
own shards), plus, per rank, the step (which fixes the data position), the scheduler and the RNG
streams. A checkpoint is written as `step-N.tmp` and renamed to `step-N` only when every rank has
finished, so a crash or Ctrl-C at any moment leaves the previous checkpoint complete and loadable.
Frozen parameters (the base model under LoRA) are never saved: they are reloaded from the base."""

from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any

from dtm_fast.errors import DtmError
from dtm_fast.train.parallel import Runtime, barrier

logger = logging.getLogger(__name__)
STEP_DIR = re.compile(r"^step-(\d{8})$")


def complete_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for child in directory.iterdir():
        match = STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / "trainer-rank0.pt").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def remove_checkpoints(directory: Path) -> None:
    for _, path in complete_checkpoints(directory):
        shutil.rmtree(path, ignore_errors=True)


def _state_dict_options(loading: bool = False):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen weights are absent on purpose; a trainable one missing from the checkpoint already
    # fails in dcp.load, so loading need not be strict about the frozen ones
    return StateDictOptions(ignore_frozen_params=True, strict=not loading)


def _rng_state(runtime: Runtime) -> dict[str, Any]:
    import torch

    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(runtime.device)
    return state


def _set_rng_state(state: dict[str, Any], runtime: Runtime) -> None:
    import torch

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and runtime.device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], runtime.device)


def save_checkpoint(directory: Path, step: int, model: Any, optimizer: Any, scheduler: Any,
                    runtime: Runtime, keep: int) -> Path:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = directory / f"step-{step:08d}"
    partial = directory / f"step-{step:08d}.tmp"
    if runtime.is_main:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir()
    barrier(runtime)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_state_dict_options())
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(partial))
    torch.save({"step": step, "world_size": runtime.world_size, "scheduler": scheduler.state_dict(),
                "rng": _rng_state(runtime)}, partial / f"trainer-rank{runtime.rank}.pt")
    barrier(runtime)
    if runtime.is_main:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for _, old in complete_checkpoints(directory)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(runtime)
    if runtime.is_main:
        logger.info("checkpoint saved: %s", final)
    return final


def load_checkpoint(directory: Path, model: Any, optimizer: Any, scheduler: Any, runtime: Runtime) -> int:
    """Restore the newest complete checkpoint; returns the number of steps it had finished."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    checkpoints = complete_checkpoints(directory)
    if not checkpoints:
        raise DtmError(f"resume: no complete checkpoint in {directory}; run without resume to start fresh")
    step, path = checkpoints[-1]
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_state_dict_options())
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=str(path))
    except Exception as error:  # DCP raises several types for mismatched or damaged checkpoints
        raise DtmError(f"resume: {path} does not match this model and configuration ({error}); "
                       "resume with the config it was written with, or start fresh") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=_state_dict_options(loading=True))
    own = path / f"trainer-rank{runtime.rank}.pt"
    trainer_state = torch.load(own if own.is_file() else path / "trainer-rank0.pt", weights_only=False)
    if trainer_state["world_size"] != runtime.world_size:
        logger.warning("checkpoint %s was written by %d ranks, this run has %d: the data order is the same, "
                       "the random streams (dropout) are not", path, trainer_state["world_size"],
                       runtime.world_size)
    scheduler.load_state_dict(trainer_state["scheduler"])
    _set_rng_state(trainer_state["rng"], runtime)
    return int(trainer_state["step"])
