"""Whether a GPU backend can be considered, decided without importing torch (2-4 s of start-up on
small machines): from the device files the GPU drivers create, and CUDA_VISIBLE_DEVICES."""

from __future__ import annotations

import glob
import os

GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia[0-9]*", "/dev/kfd")  # NVIDIA, and ROCm's compute device


def interpreting() -> bool:
    """Triton kernels run on CPU tensors through Triton's interpreter (tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def gpu_may_be_present() -> bool:
    """False when this machine certainly has no usable GPU: no device files, or none made visible."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    return any(glob.glob(pattern) for pattern in GPU_DEVICE_FILES)
