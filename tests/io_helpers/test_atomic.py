from __future__ import annotations

import json
import math

from dtm_fast.io.atomic import write_json


def test_non_finite_numbers_become_null_and_the_file_is_strict_json(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"a": math.nan, "b": [1.0, math.inf], "c": {"d": -math.inf}, "e": 2})
    text = path.read_text()
    assert json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name))) == \
        {"a": None, "b": [1.0, None], "c": {"d": None}, "e": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temporary left
