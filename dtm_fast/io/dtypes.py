"""The one dtype table. dtm names a tensor dtype by its safetensors tag ("BF16"); this module maps
tags to their sizes and torch names, and the names users write ("bfloat16", "bf16", "torch.float16")
to tags. torch itself is imported only by `torch_dtype`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dtype:
    tag: str  # safetensors dtype tag
    size: int  # bytes per element
    torch_name: str  # attribute of the torch module
    aliases: tuple[str, ...] = ()  # other names users and configs write for it
    floating: bool = False


TABLE = {d.tag: d for d in (
    Dtype("F64", 8, "float64", ("float64", "fp64", "double"), floating=True),
    Dtype("F32", 4, "float32", ("float32", "fp32", "float"), floating=True),
    Dtype("F16", 2, "float16", ("float16", "fp16", "half"), floating=True),
    Dtype("BF16", 2, "bfloat16", ("bfloat16", "bf16"), floating=True),
    Dtype("F8_E4M3", 1, "float8_e4m3fn"),
    Dtype("F8_E5M2", 1, "float8_e5m2"),
    Dtype("I64", 8, "int64"), Dtype("I32", 4, "int32"), Dtype("I16", 2, "int16"), Dtype("I8", 1, "int8"),
    Dtype("U64", 8, "uint64"), Dtype("U32", 4, "uint32"), Dtype("U16", 2, "uint16"), Dtype("U8", 1, "uint8"),
    Dtype("BOOL", 1, "bool"),
)}

DTYPE_SIZES = {tag: d.size for tag, d in TABLE.items()}
FLOAT_DTYPES = tuple(tag for tag, d in TABLE.items() if d.floating)  # the dtypes a merge combines
OUTPUT_DTYPE_NAMES = ("bfloat16", "float16", "float32")  # what --dtype / out_dtype may ask for
# a name a user writes -> safetensors tag (the float dtypes a merge can produce, by any of their names)
NAME_TO_TAG = {alias: tag for tag in ("BF16", "F16", "F32") for alias in TABLE[tag].aliases}
_TORCH_TO_TAG = {f"torch.{d.torch_name}": tag for tag, d in TABLE.items()}


def torch_name(tag: str) -> str:
    """"float32" for "F32": what config.json's torch_dtype and torch's attribute call it."""
    return TABLE[tag].torch_name


def torch_dtype(tag: str):
    """The torch dtype of a safetensors tag (imports torch)."""
    import torch

    return getattr(torch, TABLE[tag].torch_name)


def tag_of(torch_dtype_or_name) -> str | None:
    """The safetensors tag of a torch dtype (or of its str(), e.g. "torch.bfloat16"); None if none."""
    return _TORCH_TO_TAG.get(str(torch_dtype_or_name))
