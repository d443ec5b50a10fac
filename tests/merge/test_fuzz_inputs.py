"""Property-based fuzzing of everything a merge parses from users' files: safetensors headers, the
shard index, mergekit YAML configs and `--param` values. Each input either loads or raises the
project's one error type (DtmError), never another exception; a crafted header cannot make the
parser hold millions of entries."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtm_fast.errors import DtmError
from dtm_fast.io.checkpoint import open_checkpoint
from dtm_fast.io.safetensors_format import read_header

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=12)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
dtypes = st.sampled_from(["F32", "BF16", "F16", "I64", "U8", "F42", "", "f32"]) | json_values
entries = st.fixed_dictionaries({"dtype": dtypes, "shape": st.lists(st.integers(-2, 9), max_size=3) | json_values,
                                 "data_offsets": st.lists(st.integers(-4, 400), min_size=0, max_size=3) | json_values})
headers = st.dictionaries(st.text(max_size=10), entries | json_values, max_size=5) | st.builds(lambda d, m: {**d, "__metadata__": m},
                             st.dictionaries(st.text(max_size=6), entries, max_size=3), json_values)


def write_file(path: Path, header_bytes: bytes, data: bytes, claimed: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header_bytes) if claimed is None else claimed) + header_bytes + data)
    return path


def loads_or_refuses(function, *args) -> None:
    try:
        function(*args)
    except DtmError:
        pass


@FUZZ
@given(header=headers, data_size=st.integers(0, 512))
def test_structured_headers_load_or_raise_dtm_error(tmp_path_factory, header, data_size):
    path = write_file(tmp_path_factory.mktemp("h") / "model.safetensors",
                      json.dumps(header).encode(), b"\0" * data_size)
    loads_or_refuses(read_header, path)


@FUZZ
@given(raw=st.binary(max_size=300), claimed=st.none() | st.integers(0, 2**64 - 1))
def test_random_bytes_load_or_raise_dtm_error(tmp_path_factory, raw, claimed):
    path = tmp_path_factory.mktemp("b") / "model.safetensors"
    if claimed is None:
        path.write_bytes(raw)
    else:
        write_file(path, raw, b"", claimed)
    loads_or_refuses(read_header, path)


@FUZZ
@given(index=json_values | st.fixed_dictionaries({"weight_map": st.dictionaries(st.text(max_size=8), json_values,
                                                                               max_size=3)}),
       raw=st.none() | st.binary(max_size=40))
def test_shard_indexes_load_or_raise_dtm_error(tmp_path_factory, index, raw):
    directory = tmp_path_factory.mktemp("index")
    write_file(directory / "model-00001-of-00001.safetensors",
               json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode(), b"\0" * 4)
    (directory / "model.safetensors.index.json").write_bytes(raw if raw is not None else json.dumps(index).encode())
    loads_or_refuses(open_checkpoint, directory)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    for name in ("a", "b"):
        (root / name).mkdir()
        write_file(root / name / "model.safetensors",
                   json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode(), b"\0" * 8)
    return root


yaml_documents = st.recursive(
    json_scalars | st.sampled_from(["a", "b", "linear", "ties", "slerp", "bfloat16", "union", "base"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["models", "model", "merge_method", "base_model", "parameters", "weight", "density", "t",
                         "slices", "sources", "layer_range", "dtype", "tokenizer_source", "filter", "value",
                         "normalize", "int8_mask", "out_dtype", "lambda"]) | st.text(max_size=6),
        inner, max_size=5),
    max_leaves=20)


@FUZZ
@given(document=yaml_documents)
def test_mergekit_configs_load_or_raise_dtm_error(tiny_models, tmp_path_factory, document):
    import yaml

    from dtm_fast.merge.mergekit_yaml import load_mergekit_yaml

    path = tmp_path_factory.mktemp("yaml") / "config.yml"
    path.write_text(yaml.safe_dump(document))
    cwd = os.getcwd()
    os.chdir(tiny_models)  # relative model names "a" and "b" exist here
    try:
        loads_or_refuses(load_mergekit_yaml, path, tiny_models / "out")
    finally:
        os.chdir(cwd)


@FUZZ
@given(text=st.binary(max_size=200))
def test_mergekit_config_bytes_load_or_raise_dtm_error(tmp_path_factory, text):
    from dtm_fast.merge.mergekit_yaml import load_mergekit_yaml

    path = tmp_path_factory.mktemp("bytes") / "config.yml"
    path.write_bytes(text)
    loads_or_refuses(load_mergekit_yaml, path, path.parent / "out")


@FUZZ
@given(method=st.sampled_from(["linear", "ties", "dare_linear", "breadcrumbs", "slerp", "model_stock"]),
       params=st.lists(st.tuples(st.sampled_from(["weight", "density", "gamma", "t", "normalize", "rescale",
                                                  "lambda", "filter_wise", "epsilon", "other"]),
                                 st.text(max_size=16) | st.sampled_from(["nan", "inf", "-1", "[1,", "[{filter: mlp}]",
                                                                         "[0, 1]", "{a: 1}", "true", "0.5"])),
                       max_size=3))
def test_merge_command_lines_build_or_raise_dtm_error(tiny_models, method, params):
    from dtm_fast.cli import build_parser
    from dtm_fast.merge.cli import build_config

    argv = ["merge", "--method", method, "--base", str(tiny_models / "a"), str(tiny_models / "a"),
            str(tiny_models / "b"), "-o", str(tiny_models / "out")]
    for name, value in params:
        argv += ["--param", f"{name}={value}"]
    loads_or_refuses(build_config, build_parser().parse_args(argv))


def test_a_header_of_millions_of_entries_is_refused_holding_little_more_than_its_bytes(tmp_path):
    count = 1_400_000
    body = b",".join(b'"t%d":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}' % i for i in range(count))
    path = write_file(tmp_path / "model.safetensors", b"{" + body + b"}", b"\0" * 4)
    size = path.stat().st_size
    script = textwrap.dedent(f"""
        import resource
        from dtm_fast.errors import DtmError
        from dtm_fast.io.safetensors_format import read_header
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            read_header({str(path)!r})
            print("loaded")
        except DtmError as error:
            print("refused", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    verdict, growth_kib = result.stdout.split()
    assert verdict == "refused"
    assert int(growth_kib) * 1024 < 2 * size, f"{int(growth_kib) / 1024:.0f} MiB for a {size / 2**20:.0f} MiB header"
