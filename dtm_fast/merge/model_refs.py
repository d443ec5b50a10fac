"""What a model name in a mergekit config points to: a local directory (absolute, or relative to the
working directory or to the config file), or a Hugging Face hub id (`org/name`, `org/name@revision`)
found in the local Hugging Face cache. Nothing is ever downloaded: a hub model that is not in the
cache is a clear error saying how to get it. mergekit's `model+lora` names a LoRA adapter applied to
that model, applied on the fly (merge/lora/on_models.py)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dtm_fast.errors import DtmError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def resolve_reference(reference: Any, config_dir: Path, where: str) -> tuple[Path, Path | None]:
    """(model directory, LoRA adapter directory or None) of a `model` or `model+lora` reference."""
    if isinstance(reference, str) and "+" in reference and not Path(reference.strip()).exists():
        model, _, adapter = reference.strip().partition("+")
        return resolve_model(model, config_dir, where), resolve_model(adapter, config_dir, f"{where} (its LoRA)")
    return resolve_model(reference, config_dir, where), None


def resolve_model(reference: Any, config_dir: Path, where: str) -> Path:
    if not isinstance(reference, str) or not reference.strip():
        raise DtmError(f"{where}: expected a model path or hub id, got {reference!r}")
    reference = reference.strip()
    if "+" in reference and not Path(reference).exists():
        raise DtmError(f"{where}: {reference!r} applies a LoRA adapter (mergekit's model+lora), which dtm reads for "
                       "merged models only, not here")
    path = Path(reference).expanduser()
    for candidate in ([path] if path.is_absolute() else [path, config_dir / path]):
        if candidate.exists():
            return candidate
    if HUB_ID.match(reference):
        return hub_snapshot(reference, where)
    raise DtmError(f"{where}: model {reference!r} not found (looked in {Path.cwd()} and {config_dir})")


def hub_snapshot(reference: str, where: str) -> Path:
    """The cached snapshot of a hub model, never downloading."""
    repo, _, revision = reference.partition("@")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError:
        raise DtmError(f"{where}: {reference!r} looks like a hub id, but huggingface_hub is not installed to read "
                       "its local cache; give a local directory") from None
    try:
        return Path(snapshot_download(repo, revision=revision or None, local_files_only=True))
    except Exception:  # huggingface_hub raises several types for a missing repo, revision or file
        raise DtmError(f"{where}: {reference!r} is not in the local Hugging Face cache ({HF_HUB_CACHE}); dtm never "
                       f"downloads: fetch it first (`huggingface-cli download {repo}`) or give a local "
                       "directory") from None
