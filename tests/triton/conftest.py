"""Fixtures for the Triton backend tests.

Interpreter tests (marked triton_interpret) run in their own process with TRITON_INTERPRET=1 set
before triton is imported (the Makefile's second pytest run); GPU tests (marked gpu) need CUDA."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def interpreted_backend():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("interpreter tests need TRITON_INTERPRET=1 set before triton is imported "
                    "(TRITON_INTERPRET=1 python -m pytest -m triton_interpret)")
    from dtm_fast.merge.backends.triton_backend import TritonBackend

    return TritonBackend()


@pytest.fixture(scope="session")
def cuda_backend():
    pytest.importorskip("triton")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: kernels would be interpreted, not run on the GPU")
    from dtm_fast.merge.backends.triton_backend import TritonBackend

    return TritonBackend()


@pytest.fixture(scope="session")
def bf16_family(tmp_path_factory):
    """Tiny: one (300, 77) matrix and a vector, several chunks at a 17 MiB budget."""
    from triton_cases import build_family

    return build_family(tmp_path_factory.mktemp("family"),
                        {"layers.0.mlp.weight": (300, 77), "layers.0.norm.weight": (77,)})


@pytest.fixture(scope="session")
def large_bf16_family(tmp_path_factory):
    """A 5632 x 2048 MLP matrix (TinyLlama's) and a vector: many chunks at a 64 MiB budget."""
    from triton_cases import build_family

    return build_family(tmp_path_factory.mktemp("large-family"),
                        {"layers.0.mlp.down_proj.weight": (5632, 2048), "layers.0.norm.weight": (2048,)})
