"""Whole `dtm merge` runs with --backend triton (interpreted on CPU) against --backend reference on the
same inputs. Small budgets split the matrix into chunks of 12288 elements (triton) and 4096
(reference), so DARE masks and TIES thresholds must not depend on chunking either."""

import pytest

pytest.importorskip("triton")

import triton_cases as cases  # noqa: E402

pytestmark = [pytest.mark.triton_interpret,
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]


@pytest.mark.parametrize("method,extra,ulps", [
    ("linear", ["--weights", "1", "2", "3"], 0),
    ("task_arithmetic", ["--lambda", "0.8"], 0),
    ("ties", ["--density", "0.3", "--weights", "1", "0.5", "0.8"], 0),
    ("dare_ties", ["--density", "0.4", "--seed", "5"], 0),
    ("dare_linear", ["--density", "0.6", "0.5", "0.7"], 0),
    ("breadcrumbs_ties", ["--density", "0.5", "--gamma", "0.05", "--rescale", "l1"], 0),
    ("model_stock", [], 1),
    ("model_stock", ["--param", "filter_wise=true"], 1),
    ("slerp", ["--t", "0.3"], 1),
])
def test_merge_equals_reference_backend(bf16_family, tmp_path, method, extra, ulps):
    cases.check_merge(bf16_family, tmp_path, method, extra, ulps, {"triton": "18MiB", "reference": "17MiB"})
