"""The trainer's configuration: one frozen, typed dataclass, loaded from YAML and overridable from
the command line (`--learning_rate 1e-4`). Defaults follow the DTM paper's recipe (Fu et al. 2024):
learning rate 3e-4 for LoRA and 2e-5 for full fine-tuning, cosine decay after a linear warmup,
sequences of at most 1024 tokens, an effective batch of 16 rows. Values, never import paths.

No heavy imports here: `dtm train --help` builds its options from these fields.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtm_fast.errors import DtmError

DEFAULT_LEARNING_RATE = {"lora": 3e-4, "full": 2e-5}
ATTENTION_CHOICES = ("auto", "flash_attention_2", "sdpa", "eager")
PRECISION_CHOICES = ("auto", "bf16", "fp32")
SCHEDULER_CHOICES = ("cosine", "linear", "constant")
EXPORT_DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class TrainConfig:
    # what to train on what
    model: str = ""                     # local HF causal-LM directory (or the directory of gguf_file)
    data: tuple[str, ...] = ()          # record files: jsonl/json/parquet/csv or a saved dataset dir
    output_dir: str = ""                # the exported sub-model (HF dir, or peft adapter dir for LoRA)
    gguf_file: str | None = None        # a .gguf inside `model` to load (de-quantised to float)
    data_format: str | None = None      # alpaca|sharegpt|messages|prompt_completion; None: detect
    first_turn_only: bool = False       # keep the first user turn and reply only (as the paper did)
    chat_template: str | None = None    # None: the tokenizer's; or chatml|llama2|alpaca|file.jinja

    # method
    finetuning: str = "full"            # full | lora
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")  # the paper's

    # optimisation
    learning_rate: float | None = None  # None: 3e-4 for LoRA, 2e-5 for full fine-tuning
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03          # share of the steps with linearly rising learning rate
    min_lr_ratio: float = 0.0           # the cosine ends at learning_rate * min_lr_ratio
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0          # 0 disables clipping
    epochs: float = 2.0
    max_steps: int | None = None        # overrides epochs
    batch_size: int = 16                # rows per optimizer step, all ranks together
    micro_batch_size: int = 1           # rows per forward pass on one rank
    max_length: int = 1024
    packing: bool = True
    overlong: str = "truncate"          # truncate | drop sequences longer than max_length
    seed: int = 42

    # execution
    attention: str = "auto"             # auto: flash_attention_2 on CUDA with flash-attn, else sdpa
    mixed_precision: str = "auto"       # auto: bf16 on CUDA, fp32 on CPU
    activation_checkpointing: bool = True
    checkpoint_every: int = 0           # steps between checkpoints; 0: none
    keep_checkpoints: int = 2
    checkpoint_dir: str | None = None   # None: <output_dir>.checkpoints
    resume: bool = False                # continue from the newest complete checkpoint
    log_every: int = 1

    # export
    export_dtype: str = "auto"          # auto: the base model's dtype (float32 for GGUF)
    max_shard_size_mb: float = 5000.0   # safetensors shard size of the export
    fisher_samples: int = 0             # >0: write fisher.safetensors estimated on that many examples

    def __post_init__(self) -> None:
        for name in ("data", "lora_target_modules"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self._check_choice("finetuning", ("full", "lora"))
        self._check_choice("lr_scheduler", SCHEDULER_CHOICES)
        self._check_choice("attention", ATTENTION_CHOICES)
        self._check_choice("mixed_precision", PRECISION_CHOICES)
        self._check_choice("overlong", ("truncate", "drop"))
        self._check_choice("export_dtype", EXPORT_DTYPE_CHOICES)
        if self.data_format is not None:
            self._check_choice("data_format", ("alpaca", "sharegpt", "messages", "prompt_completion"))
        for name in ("batch_size", "micro_batch_size", "max_length", "lora_r", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise DtmError(f"config: {name} must be at least 1, got {getattr(self, name)}")
        for name in ("checkpoint_every", "fisher_samples", "max_grad_norm", "weight_decay", "lora_dropout"):
            if getattr(self, name) < 0:
                raise DtmError(f"config: {name} must not be negative, got {getattr(self, name)}")
        if self.max_shard_size_mb <= 0:
            raise DtmError(f"config: max_shard_size_mb must be positive, got {self.max_shard_size_mb}")
        if not 0 <= self.warmup_ratio < 1:
            raise DtmError(f"config: warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.epochs <= 0 and self.max_steps is None:
            raise DtmError(f"config: epochs must be positive, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise DtmError(f"config: max_steps must be at least 1, got {self.max_steps}")
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise DtmError(f"config: learning_rate must be positive, got {self.learning_rate}")
        if self.batch_size % self.micro_batch_size:
            raise DtmError(f"config: batch_size {self.batch_size} is not a multiple of micro_batch_size "
                           f"{self.micro_batch_size}")

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        if getattr(self, name) not in choices:
            raise DtmError(f"config: {name} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")

    def require_paths(self) -> None:
        """The fields without defaults; checked when a run starts, not when a config is built."""
        for name in ("model", "data", "output_dir"):
            if not getattr(self, name):
                raise DtmError(f"config: {name} is required (set it in the YAML file or with --{name})")

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LEARNING_RATE[self.finetuning]

    @property
    def checkpoints_path(self) -> Path:
        return Path(self.checkpoint_dir) if self.checkpoint_dir else Path(f"{self.output_dir}.checkpoints")

    def gradient_accumulation(self, world_size: int) -> int:
        if self.batch_size % (self.micro_batch_size * world_size):
            raise DtmError(
                f"batch_size {self.batch_size} cannot be split over {world_size} ranks with micro_batch_size "
                f"{self.micro_batch_size}: it must be a multiple of micro_batch_size x ranks = "
                f"{self.micro_batch_size * world_size}")
        return self.batch_size // (self.micro_batch_size * world_size)

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))


# names other trainers use for our keys, to point users of those at the right one
FOREIGN_NAMES = {
    "lr": "learning_rate", "num_train_epochs": "epochs", "num_epochs": "epochs", "model_name_or_path": "model",
    "per_device_train_batch_size": "micro_batch_size", "max_seq_length": "max_length", "output": "output_dir",
    "target_modules": "lora_target_modules", "lora_rank": "lora_r", "gradient_checkpointing": "activation_checkpointing",
    "gradient_accumulation_steps": "batch_size (accumulation follows from batch_size / (micro_batch_size x ranks))",
}


def _unknown_key_error(key: str, where: str) -> DtmError:
    if key in FOREIGN_NAMES:
        return DtmError(f"{where}: unknown config key {key!r}; use {FOREIGN_NAMES[key]}")
    close = difflib.get_close_matches(key, FIELD_NAMES, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(FIELD_NAMES)}"
    return DtmError(f"{where}: unknown config key {key!r}{hint}")


def parse_value(text: str) -> Any:
    """A command-line value read as YAML, so 1e-4, true, null and [a, b] mean what they look like."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML file (keys = TrainConfig fields) and apply overrides on top."""
    values: dict[str, Any] = {}
    if path is not None:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise DtmError(f"{path}: no such config file")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as error:
            raise DtmError(f"{path}: not valid YAML ({error})") from None
        if not isinstance(loaded, dict):
            raise DtmError(f"{path}: expected a mapping of config keys to values")
        for key in loaded:
            if key not in FIELD_NAMES:
                raise _unknown_key_error(str(key), str(path))
        values.update(loaded)
    for key, value in (overrides or {}).items():
        key = key.replace("-", "_")
        if key not in FIELD_NAMES:
            raise _unknown_key_error(key, "command line")
        values[key] = value
    _check_types(values)
    return TrainConfig(**values)


def _check_types(values: dict[str, Any]) -> None:
    """Name the field when a value has the wrong type (YAML makes `lr: 3e-4` a string, for one)."""
    annotations = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    for key, value in values.items():
        expected = annotations[key]
        if value is None:
            if "None" not in expected:
                raise DtmError(f"config: {key} cannot be empty")
            continue
        if expected.startswith("float"):
            if isinstance(value, str):
                try:
                    value = values[key] = float(value)
                except ValueError:
                    raise DtmError(f"config: {key} should be a number, got {value!r}") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DtmError(f"config: {key} should be a number, got {value!r}")
            values[key] = float(value)
        elif expected.startswith("int"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise DtmError(f"config: {key} should be a whole number, got {value!r}")
        elif expected == "bool":
            if not isinstance(value, bool):
                raise DtmError(f"config: {key} should be true or false, got {value!r}")
        elif expected.startswith("tuple"):
            if isinstance(value, str):
                values[key] = (value,)
            elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                values[key] = tuple(value)
            else:
                raise DtmError(f"config: {key} should be a list of text values, got {value!r}")
        elif expected.startswith("str"):
            if not isinstance(value, str):
                values[key] = str(value)
