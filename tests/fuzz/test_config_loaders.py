"""Property-based fuzzing of every config loader of disperse, eval and run, the eval task files and
the data-record readers: each input either loads or raises DtmError, never another exception."""

from __future__ import annotations

import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtm_fast.errors import DtmError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["auto", "linear", "ties", "random", "kmeans", "lora",
                                                           "mmlu", "-1", "1e-4", "2GiB", ".nan"]))


def values_with_keys(keys: tuple[str, ...]):
    """Mappings whose keys are mostly the loader's own (so the checks past the key check are reached)."""
    leaves = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                             st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                          max_leaves=6)
    return st.dictionaries(st.one_of(st.sampled_from(keys), st.text(max_size=8)), leaves, max_size=len(keys))


def loads_or_refuses(load, *arguments) -> None:
    try:
        load(*arguments)
    except DtmError as error:
        assert str(error) and "\n" not in str(error).strip()


# ---- disperse ----------------------------------------------------------------------------------------
@FUZZ
@given(values_with_keys(("inputs", "output_dir", "k", "method", "seed", "format", "first_turn_only",
                         "output_format", "embed", "encoder", "balance", "embed_max_length", "embed_batch_size",
                         "device", "field", "overwrite")))
def test_disperse_config(values):
    from dtm_fast.disperse.config import DisperseConfig

    loads_or_refuses(DisperseConfig.from_dict, {"inputs": ["x.jsonl"], "output_dir": "o", "k": 2, **values})


# ---- eval -------------------------------------------------------------------------------------------
@FUZZ
@given(values_with_keys(("models", "tasks", "output_dir", "ensemble", "limit", "num_fewshot", "batch_size",
                         "device", "dtype", "seed", "bootstrap_iters", "apply_chat_template", "fewshot_as_multiturn",
                         "backend", "overwrite")))
def test_eval_config(values):
    from dtm_fast.eval.config import EvalConfig

    base = {"models": [{"name": "base", "path": "b", "role": "base"}], "tasks": ["mmlu"], "output_dir": "o"}
    loads_or_refuses(EvalConfig.from_dict, {**base, **values})


@FUZZ
@given(st.text(max_size=40))
def test_task_spec_text(text):
    from dtm_fast.eval.config import TaskSpec

    loads_or_refuses(TaskSpec.parse, text)


@FUZZ
@given(st.lists(st.one_of(st.binary(max_size=80), st.builds(
    lambda q, c, a: yaml.safe_dump({"question": q, "choices": c, "answer": a}, default_flow_style=True).strip(),
    scalars, st.lists(scalars, max_size=4), scalars).map(str.encode)), max_size=4))
def test_task_files(tmp_path_factory, lines):
    from dtm_fast.eval.tasks import load_mmlu_jsonl

    path = tmp_path_factory.mktemp("task") / "t.jsonl"
    path.write_bytes(b"\n".join(lines))
    loads_or_refuses(load_mmlu_jsonl, path)


# ---- records ----------------------------------------------------------------------------------------
@FUZZ
@given(st.sampled_from([".jsonl", ".json", ".csv"]), st.one_of(st.binary(max_size=120), st.recursive(
    scalars, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(
        st.sampled_from(["messages", "role", "content", "instruction", "output", "prompt", "completion",
                         "conversations", "from", "value", "input", "system"]), inner, max_size=4)),
    max_leaves=10).map(lambda v: yaml.safe_dump(v).encode() if not isinstance(v, (dict, list)) else
                       __import__("json").dumps(v).encode())))
def test_data_records(tmp_path_factory, suffix, content):
    from dtm_fast.data.records import load_conversations

    path = tmp_path_factory.mktemp("data") / f"d{suffix}"
    path.write_bytes(content)
    loads_or_refuses(load_conversations, [path])


# ---- run --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_assets(tmp_path_factory):
    from tests.run.conftest import base_values
    from dtm_fast.train.tiny import write_tiny_llama

    root = tmp_path_factory.mktemp("fuzz-run")
    write_tiny_llama(root / "base", hidden_size=16, layers=1, heads=2, seed=0)
    (root / "data.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    (root / "mmlu.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n')
    return root, base_values()


SECTION_KEYS = {
    "disperse": ("method", "seed", "format", "first_turn_only", "output_format", "embed", "encoder", "balance",
                 "embed_max_length", "field"),
    "train": ("finetuning", "lora_r", "lora_alpha", "learning_rate", "epochs", "max_steps", "batch_size",
              "micro_batch_size", "max_length", "seed", "lora_target_modules", "warmup_ratio"),
    "merge": ("method", "parameters", "weights", "lora_mode", "dtype", "max_memory", "max_shard_size", "backend",
              "seed", "name"),
    "eval": ("tasks", "batch_size", "limit", "num_fewshot", "seed", "bootstrap_iters", "sub_models", "ensemble",
             "backend", "apply_chat_template"),
    "slurm": ("partition", "time", "nodes", "gpus_per_node", "setup", "extra_sbatch"),
    "launch": ("nproc_per_node",),
}


@FUZZ
@given(st.data())
def test_run_config(run_assets, data):
    from dtm_fast.run.config import TOP_LEVEL_KEYS, parse_run_config

    root, good = run_assets
    values = dict(good)
    changed = data.draw(st.sampled_from(TOP_LEVEL_KEYS + tuple(SECTION_KEYS)))
    if changed in SECTION_KEYS and data.draw(st.booleans()):
        section = data.draw(values_with_keys(SECTION_KEYS[changed]))
        values[changed] = [section, section] if changed == "merge" and data.draw(st.booleans()) else section
    else:
        values[changed] = data.draw(values_with_keys(("a",)) | scalars | st.lists(scalars, max_size=3))
    loads_or_refuses(parse_run_config, values, root / "dtm.yaml")


@FUZZ
@given(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode),
                 st.sampled_from([b"k: 2001-13-45\n", b"a: &x [*x]\n", b"[" * 200, b"\xff\xfe", b"k: !!python/object:os.system x",
                                  b"? [1]\n: 2\n"])))
def test_run_config_file_bytes(tmp_path_factory, content):
    from dtm_fast.run.config import load_run_config

    path = tmp_path_factory.mktemp("yaml") / "dtm.yaml"
    path.write_bytes(content)
    loads_or_refuses(load_run_config, path)


def test_nan_is_refused_where_a_number_belongs(run_assets):
    from dtm_fast.run.config import parse_run_config

    root, good = run_assets
    for changes, field in [({"merge": {"weights": [math.nan, 1.0]}}, "merge.weights must be finite"),
                           ({"merge": {"weights": [math.inf, 1.0]}}, "merge.weights must be finite"),
                           ({"k": math.nan}, "'k' must be a whole number"),
                           ({"seeds": [math.inf]}, "'seeds[0]' must be a whole number"),
                           ({"eval": {**good["eval"], "limit": math.nan}}, "'limit' must be a whole number"),
                           ({"eval": {**good["eval"], "bootstrap_iters": -1}}, "'bootstrap_iters' must be at least 0"),
                           ({"launch": {"nproc_per_node": math.inf}}, "'nproc_per_node' must be a whole number")]:
        with pytest.raises(DtmError, match=__import__("re").escape(field)):
            parse_run_config({**good, **changes}, root / "dtm.yaml")
