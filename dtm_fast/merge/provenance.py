"""What identifies a merge (the fingerprint that guards --resume) and what it records about itself
(dtm_merge.json).

Every input file is identified on disk (device, inode, size, mtime_ns; with --verify-inputs also its
sha256), not only by its header: two fine-tunes of one architecture have identical headers, and a
file rewritten in place keeps its header. A partial output is resumed only when every input is the
same file it was; otherwise the refusal names the input that changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from dtm_fast import __version__
from dtm_fast.io.hashing import describe_identity_change, file_identity, file_sha256

if TYPE_CHECKING:
    from dtm_fast.io.checkpoint import Checkpoint
    from dtm_fast.merge.config import MergeConfig
    from dtm_fast.merge.inputs import Inputs
    from dtm_fast.merge.plan import OutputPlan


def checkpoint_identity(checkpoint: "Checkpoint", hash_contents: bool) -> dict[str, Any]:
    files = []
    for path in checkpoint.files:
        identity = file_identity(path)
        if hash_contents:
            identity["sha256"] = file_sha256(path)
        files.append(identity)
    return {"header_sha256": checkpoint.header_sha256, "files": files}


def input_identities(inputs: "Inputs", hash_contents: bool) -> dict[str, dict[str, Any]]:
    """label -> identity of every input checkpoint (base, models, Fisher estimates)."""
    return {checkpoint.label: checkpoint_identity(checkpoint, hash_contents) for checkpoint in inputs.all()}


def fingerprint(config: "MergeConfig", plan: "OutputPlan", identities: dict, source_fields: dict) -> dict:
    """Same fingerprint, same output bytes."""
    return {
        "method": config.method,
        "parameters": config.parameters,
        "models": [{"path": str(m.path), "parameters": m.parameters} for m in config.models],
        "base": str(config.base) if config.base is not None else None,
        "inputs": identities,
        "dtype": config.dtype,
        "seed": config.seed,
        "shards": [[s.filename, s.size] for s in plan.shards],
        "version": __version__,
        **source_fields,
    }


def explain_difference(previous: dict, current: dict, partial: Path) -> str:
    """Why a partial output cannot be resumed by this merge, naming what changed."""
    restart = f"remove {partial} to merge from scratch"
    old_inputs, new_inputs = previous.get("inputs") or {}, current.get("inputs") or {}
    if set(old_inputs) == set(new_inputs):
        for label, new in new_inputs.items():
            old = old_inputs[label]
            if not isinstance(old, dict):
                continue
            if old.get("header_sha256") != new.get("header_sha256"):
                return (f"{partial} holds an interrupted merge, but the tensors of input {label} changed since "
                        f"(its safetensors headers differ); its finished shards cannot be reused: {restart}")
            for old_file, new_file in zip(old.get("files") or [], new.get("files") or []):
                if isinstance(old_file, dict) and _changed(old_file, new_file):
                    return (f"{partial} holds an interrupted merge, but input file {new_file['path']} changed since "
                            f"it started ({describe_identity_change(old_file, new_file)}); shards already written "
                            f"may hold its old weights: {restart}, or restore the file and rerun with --resume")
    changed = sorted(key for key in set(previous) | set(current) if key != "inputs"
                     and previous.get(key) != current.get(key))
    what = ", ".join(changed) if changed else "its inputs"
    return (f"{partial} holds an interrupted merge with different settings ({what}); rerun that merge with "
            f"--resume, or {restart}")


def _changed(old: dict, new: dict) -> bool:
    keys = ("device", "inode", "size", "mtime_ns") + (("sha256",) if "sha256" in old and "sha256" in new else ())
    return any(old.get(key) != new.get(key) for key in keys)


def record(config: "MergeConfig", inputs: "Inputs", identities: dict, backend_name: str | None,
           copied: list[str], nonfinite: list[dict], source_fields: dict) -> dict:
    """dtm_merge.json: what was merged from what, how, by which version."""
    def described(path, checkpoint, parameters=None) -> dict:
        entry = {"path": str(path), **identities[checkpoint.label]}
        if parameters is not None:
            entry["parameters"] = parameters
        return entry

    return {
        "tool": "dtm_fast",
        "version": __version__,
        "method": config.method,
        "parameters": config.parameters,
        "base": described(config.base, inputs.base) if inputs.base is not None else None,
        "models": [described(m.path, c, m.parameters) for m, c in zip(config.models, inputs.models)],
        "dtype": config.dtype,
        "seed": config.seed,
        "backend": backend_name,
        "copied_files": copied,
        "nonfinite_inputs": nonfinite,
        **source_fields,
    }
