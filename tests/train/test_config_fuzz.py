"""Property-based guard of the train config loader: whatever bytes or YAML a config file holds, and
whatever a command line passes, the loader returns a TrainConfig or raises DtmError, never another
exception (which the user would see as an internal error)."""

import math

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtm_fast.errors import DtmError
from dtm_fast.train.config import FIELD_NAMES, NUMERIC_RANGES, TrainConfig, load_config, parse_value

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
           | st.sampled_from(["nan", ".inf", "-.inf", "1e-4", "3e400", "", "full", "lora", "auto", "~"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                         max_size=3), max_leaves=12)
keys = st.sampled_from(FIELD_NAMES) | st.text(max_size=12) | st.integers()
YAML_PIECES = ["model: ", "data: ", "[", "]", "{", "}", ": ", "- ", "\n", "  ", "'", '"', "&a ", "*a", "!!python/object:os.system ",
               ".nan", "1e3", "lora_alpha", "learning_rate", "!!binary ", "---\n", "...", "#", "\t", "\\", "\x00", "é"]


def load_or_refuse(path):
    try:
        config = load_config(path)
    except DtmError as error:
        assert str(error) and "\n" not in str(error), repr(error)
        return None
    assert isinstance(config, TrainConfig)
    return config


@FUZZ
@given(st.binary(max_size=400))
def test_any_bytes_load_or_raise_dtm_error(tmp_path, data):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(data)
    load_or_refuse(path)


@FUZZ
@given(st.lists(st.sampled_from(YAML_PIECES) | st.text(max_size=6), max_size=30))
def test_yaml_like_text_loads_or_raises_dtm_error(tmp_path, pieces):
    path = tmp_path / "fuzz.yaml"
    path.write_bytes("".join(pieces).encode("utf-8", "surrogatepass"))
    load_or_refuse(path)


@FUZZ
@given(st.dictionaries(keys, values, max_size=8))
def test_mappings_of_any_shape_load_or_raise_dtm_error(tmp_path, mapping):
    path = tmp_path / "fuzz.yaml"
    path.write_text(yaml.safe_dump(mapping, allow_unicode=True))
    config = load_or_refuse(path)
    if config is not None:  # what loaded is in range: no NaN or out-of-range number slipped through
        for name, (low, high, _) in NUMERIC_RANGES.items():
            value = getattr(config, name)
            if value is not None:
                assert math.isfinite(value) and (low is None or value >= low) and (high is None or value <= high)


@FUZZ
@given(st.dictionaries(st.sampled_from(FIELD_NAMES), st.text(max_size=12) | st.sampled_from(["nan", "[1,", "{a: [",
                                                                                             "null", "true", "1e999"]),
                       max_size=6))
def test_command_line_overrides_load_or_raise_dtm_error(overrides):
    try:
        load_config(None, {key: parse_value(text) for key, text in overrides.items()})
    except DtmError:
        pass


def test_the_fuzzer_reaches_both_outcomes(tmp_path):
    """The control: the strategies above can produce a config that loads and one that is refused."""
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"model": "m", "learning_rate": 1e-4}))
    assert load_or_refuse(good) is not None
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"learning_rate": float("nan")}))
    assert load_or_refuse(bad) is None
