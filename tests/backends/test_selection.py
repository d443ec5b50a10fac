"""SCE's variance, selection and combine, arcee_fusion's importance and combine, and the order keys
their statistics are ranked by, on every accelerated backend against the reference: every dtype pair,
the backend's block boundaries, with and without NaN/Inf in the inputs."""

from __future__ import annotations

import pytest

from . import cases
from .conftest import SIZE_NAMES
from .test_combine import DTYPE_PAIRS, PAIR_IDS

# torch.var warns on an empty chunk (no degrees of freedom); its NaN-free empty result is what is compared
pytestmark = pytest.mark.filterwarnings("ignore:var\\(\\)")


@pytest.mark.parametrize("special", [False, True], ids=["finite", "nan-inf"])
@pytest.mark.parametrize("size", SIZE_NAMES)
@pytest.mark.parametrize("in_dtype,out_dtype", DTYPE_PAIRS, ids=PAIR_IDS)
def test_sce(accelerated, size, in_dtype, out_dtype, special):
    cases.check_sce(accelerated, accelerated.size(size), in_dtype, out_dtype, special=special)


@pytest.mark.parametrize("models", [1, 2, 5])
def test_sce_model_counts(accelerated, models):
    import torch

    cases.check_sce(accelerated, accelerated.size("many-blocks"), torch.bfloat16, torch.float32, models=models)


@pytest.mark.parametrize("special", [False, True], ids=["finite", "nan-inf"])
@pytest.mark.parametrize("size", SIZE_NAMES)
@pytest.mark.parametrize("in_dtype,out_dtype", DTYPE_PAIRS, ids=PAIR_IDS)
def test_arcee_fusion(accelerated, size, in_dtype, out_dtype, special):
    cases.check_fusion(accelerated, accelerated.size(size), in_dtype, out_dtype, special=special)


@pytest.mark.parametrize("size", SIZE_NAMES)
def test_order_keys(accelerated, size):
    cases.check_order_keys(accelerated, accelerated.size(size))
