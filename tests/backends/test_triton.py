"""How the Triton backend reports whether it can run (main pytest process), and its contract under
the interpreter (TRITON_INTERPRET=1 process)."""

import os
import subprocess
import sys

import pytest
import torch

from dtm_fast.errors import DtmError


def test_importing_the_backend_does_no_work():
    """Importing the module neither imports triton nor touches CUDA (dtm --help stays instant)."""
    code = ("import sys; import dtm_fast.merge.backends.triton_backend as b; "
            "assert 'triton' not in sys.modules, 'triton imported'; "
            "import torch; assert not torch.cuda.is_initialized(), 'CUDA initialised'")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "TRITON_INTERPRET": ""})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is missing")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the interpreter makes the backend available")
def test_without_cuda_the_backend_says_why():
    from dtm_fast.merge.backends import select_backend
    from dtm_fast.merge.backends.triton_backend import unavailable_reason

    reason = unavailable_reason()
    assert reason is not None and ("CUDA" in reason or "triton" in reason)
    with pytest.raises(DtmError, match="--backend triton cannot run here"):
        select_backend("triton")


def test_missing_triton_is_reported(monkeypatch):
    import importlib.util

    from dtm_fast.merge.backends import triton_backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # past the CUDA check on machines without a GPU
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real_find_spec(name, *a))
    assert "pip install" in triton_backend.unavailable_reason()


@pytest.mark.triton_interpret
def test_backend_contract_under_the_interpreter():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 set before triton is imported")
    from dtm_fast.merge.backends import select_backend, triton_backend

    assert triton_backend.unavailable_reason() is None
    backend = select_backend("triton")
    assert backend.name == "triton"
    assert backend.wants_pinned_buffers is False  # nothing is copied to a GPU
    assert backend.workspace_bytes_per_element(4) > 0
