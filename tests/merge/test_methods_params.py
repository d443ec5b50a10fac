"""The new methods' parameters are checked up front: a bad value, a missing required one or a
setting dtm does not support is one line naming the parameter (and the model), exit status 1."""

from __future__ import annotations

import pytest
import torch

from conftest import write_safetensors
from dtm_fast.cli import main as dtm


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("params")
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(8, 4, generator=generator)
    paths = [write_safetensors(root / "base" / "model.safetensors", {"w": base}).parent]
    for index in range(3):
        paths.append(write_safetensors(root / f"m{index}" / "model.safetensors",
                                       {"w": base + 0.1 * torch.randn(8, 4, generator=generator)}).parent)
    return paths


CASES = [
    ("karcher", 3, ["--param", "tol=-1"], "parameter 'tol' = -1 must be > 0"),
    ("karcher", 3, ["--param", "max_iter=-2"], "parameter 'max_iter' = -2 must be >= 0"),
    ("ram", 2, ["--param", "epsilon=-0.1"], "parameter 'epsilon' = -0.1 must be >= 0"),
    ("sce", 2, ["--param", "select_topk=half"], "expected a number, got 'half'"),
    ("sce", 2, ["--param", "select_topk=.inf"], "must be a finite number, got inf"),
    ("nuslerp", 2, ["--weights", "1", "2", "--param", "nuslerp_row_wise=sometimes"], "expected true or false"),
    ("arcee_fusion", 2, [], "arcee_fusion takes at most 1 model(s) besides the base, got 2"),
    ("nuslerp", 3, ["--weights", "1", "2", "3"], "nuslerp takes at most 2 model(s) besides the base, got 3"),
    ("multislerp", 2, [], "needs parameter 'weight'"),
    ("nearswap", 1, [], "nearswap needs parameter 't'"),
    ("passthrough", 2, [], "passthrough takes at most 1 model(s)"),
    ("multislerp", 2, ["--weights", "1", "1", "--param", "eps=0"], "parameter 'eps' = 0 must be > 0"),
]


@pytest.mark.parametrize("method,count,options,message", CASES)
def test_a_bad_parameter_is_one_line(small, tmp_path, capsys, method, count, options, message):
    models = [str(p) for p in small[1:1 + count]]
    assert dtm(["merge", "--method", method, "--base", str(small[0]), *models, *options,
                "-o", str(tmp_path / "out"), "--quiet"]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("method,options", [
    ("karcher", []), ("ram", []), ("ramplus_tl", ["--param", "r=0.3"]), ("multislerp", ["--weights", "1", "2"]),
    ("sce", []), ("sce", ["--param", "select_topk=0.5"]), ("sce", ["--param", "select_topk=0"]),
    ("nuslerp", ["--weights", "1", "2", "--param", "nuslerp_flatten=false"]),
    ("nuslerp", ["--weights", "1", "2", "--param", "nuslerp_flatten=false", "--param", "nuslerp_row_wise=true"]),
])
def test_good_parameters_merge(small, tmp_path, method, options):
    assert dtm(["merge", "--method", method, "--base", str(small[0]), str(small[1]), str(small[2]), *options,
                "-o", str(tmp_path / "out"), "--quiet"]) == 0


def test_arcee_fusion_merges_one_model(small, tmp_path):
    assert dtm(["merge", "--method", "arcee_fusion", "--base", str(small[0]), str(small[1]),
                "-o", str(tmp_path / "out"), "--quiet"]) == 0
