"""The trainer's configuration: one frozen, typed dataclass, loaded from YAML and overridable from
the command line (`--learning_rate 1e-4`). Defaults follow the DTM paper's recipe (Fu et al. 2024):
learning rate 3e-4 for LoRA and 2e-5 for full fine-tuning, cosine decay after a linear warmup,
sequences of at most 1024 tokens, an effective batch of 16 rows. Values, never import paths.

No heavy imports here: `dtm train --help` builds its options from these fields.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dtm_fast.errors import DtmError

DEFAULT_LEARNING_RATE = {"lora": 3e-4, "full": 2e-5}
ATTENTION_CHOICES = ("auto", "flash_attention_2", "sdpa", "eager")
PRECISION_CHOICES = ("auto", "bf16", "fp32")
SCHEDULER_CHOICES = ("cosine", "linear", "constant")
EXPORT_DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


COUNT_LIMIT = 2**31 - 1  # beyond this a count is a typo, and loops over it would never end

# field -> (low, high, shape): shape says whether each bound is included, "[]", "[)", "(]" or "()";
# None for no bound. Every value must also be finite: NaN compares false with everything, so a
# plain `< 0` test would let it through.
NUMERIC_RANGES: dict[str, tuple[float | None, float | None, str]] = {
    "lora_r": (1, COUNT_LIMIT, "[]"), "lora_alpha": (0, None, "()"), "lora_dropout": (0, 1, "[)"),
    "learning_rate": (0, None, "()"), "warmup_ratio": (0, 1, "[)"), "min_lr_ratio": (0, 1, "[]"),
    "weight_decay": (0, None, "[)"), "adam_beta1": (0, 1, "[)"), "adam_beta2": (0, 1, "[)"),
    "adam_epsilon": (0, None, "()"), "max_grad_norm": (0, None, "[)"), "epochs": (0, None, "()"),
    "max_steps": (1, COUNT_LIMIT, "[]"), "batch_size": (1, COUNT_LIMIT, "[]"),
    "micro_batch_size": (1, COUNT_LIMIT, "[]"), "max_length": (1, COUNT_LIMIT, "[]"),
    "seed": (0, 2**63 - 1, "[]"), "checkpoint_every": (0, COUNT_LIMIT, "[]"),
    "keep_checkpoints": (1, COUNT_LIMIT, "[]"), "log_every": (1, COUNT_LIMIT, "[]"),
    "max_shard_size_mb": (0, None, "()"), "fisher_samples": (0, COUNT_LIMIT, "[]"),
    "peak_tflops": (0, None, "()"),
}


def _check_range(name: str, value: float, low: float | None, high: float | None, shape: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DtmError(f"config: {name} should be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise DtmError(f"config: {name} must be a finite number, got {value}")
    too_low = low is not None and (value < low or (shape[0] == "(" and value == low))
    too_high = high is not None and (value > high or (shape[1] == ")" and value == high))
    if too_low or too_high:
        interval = f"{shape[0]}{'-inf' if low is None else low}, {'inf' if high is None else high}{shape[1]}"
        raise DtmError(f"config: {name} must be in {interval}, got {value}")


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
    resume: bool = False                # require a checkpoint to continue from (one of this run is
                                        # continued anyway; see checkpoint.py)
    fresh: bool = False                 # delete this run's checkpoints and start from step 0
    overwrite: bool = False             # write into a non-empty output_dir dtm train did not write
                                        # (files dtm did not write are kept)
    compile: bool = False               # torch.compile each decoder layer
    peak_tflops: float | None = None    # the device's peak for MFU; None: looked up by device name
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
        for name, (low, high, shape) in NUMERIC_RANGES.items():
            value = getattr(self, name)
            if value is not None:
                _check_range(name, value, low, high, shape)
        if self.batch_size % self.micro_batch_size:
            raise DtmError(f"config: batch_size {self.batch_size} is not a multiple of micro_batch_size "
                           f"{self.micro_batch_size}")
        if not self.lora_target_modules or not all(self.lora_target_modules):
            raise DtmError("config: lora_target_modules needs at least one module name, e.g. [q_proj, v_proj]")
        if self.resume and self.fresh:
            raise DtmError("config: resume and fresh contradict each other (resume continues the checkpoints, "
                           "fresh deletes them); set one")

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

    def training_settings(self) -> dict[str, Any]:
        """The keys that decide the trained weights: a checkpoint continues only a run whose
        settings equal the ones it recorded (model and data are compared by content separately)."""
        return {key: value for key, value in self.to_dict().items() if key not in NOT_TRAINING_SETTINGS}


# keys that change where things go, how often they are saved or how the result is written, but not
# one number of the training itself; changing them never stops a checkpoint from being continued
NOT_TRAINING_SETTINGS = frozenset({
    "model", "data", "output_dir", "checkpoint_dir", "resume", "fresh", "overwrite", "log_every",
    "checkpoint_every", "keep_checkpoints", "export_dtype", "max_shard_size_mb", "fisher_samples", "compile",
    "peak_tflops"})


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


MAX_CONFIG_BYTES = 16 * 2**20  # far above any real config; keeps a wrong file from filling memory


def parse_value(text: str) -> Any:
    """A command-line value read as YAML, so 1e-4, true, null and [a, b] mean what they look like."""
    import yaml

    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError):
        return text


def _shown(value: Any) -> str:
    """A value as an error message quotes it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_config_file(path: Path) -> dict[str, Any]:
    """The YAML mapping in `path`; every way the file can be wrong is a DtmError naming it."""
    from dtm_fast.io.text_files import load_yaml

    try:
        size = path.stat().st_size
    except OSError:
        size = 0  # load_yaml names what is wrong with the path
    if size > MAX_CONFIG_BYTES:
        raise DtmError(f"{path}: {size:,} bytes is too large for a config file; is this the right file?")
    loaded = load_yaml(path, "config file")
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise DtmError(f"{path}: expected a mapping of config keys to values, got {type(loaded).__name__}")
    return loaded


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML file (keys = TrainConfig fields) and apply overrides on top."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        loaded = read_config_file(path)
        for key in loaded:
            if not isinstance(key, str) or key not in FIELD_NAMES:
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
    """Name the field when a value has the wrong type or shape (YAML makes `lr: 3e-4` a string, a
    stray dash makes a list); values are converted in place where the meaning is plain."""
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
                    value = float(value)
                except ValueError:
                    raise DtmError(f"config: {key} should be a number, got {_shown(value)}") from None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DtmError(f"config: {key} should be a number, got {_shown(value)}")
            try:
                values[key] = float(value)
            except OverflowError:
                raise DtmError(f"config: {key} = {_shown(value)} is too large") from None
        elif expected.startswith("int"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise DtmError(f"config: {key} should be a whole number, got {_shown(value)}")
        elif expected == "bool":
            if not isinstance(value, bool):
                raise DtmError(f"config: {key} should be true or false, got {_shown(value)}")
        elif expected.startswith("tuple"):
            if isinstance(value, str):
                values[key] = (value,)
            elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                values[key] = tuple(value)
            else:
                raise DtmError(f"config: {key} should be a list of text values, got {_shown(value)}")
        elif expected.startswith("str"):
            if not isinstance(value, str):
                raise DtmError(f"config: {key} should be text, got {_shown(value)} (a {type(value).__name__}); "
                               "quote it if it is a name")
