"""Field dispersal: groups stay whole and are packed into K balanced portions."""

from __future__ import annotations

import json

import pytest

from dtm_fast.disperse import DisperseConfig, disperse
from dtm_fast.disperse.methods.field import pack_groups
from dtm_fast.errors import DtmError

from .data_factory import write_jsonl


def test_pack_groups_matches_a_hand_computed_packing():
    # sizes 7, 5, 4, 3, 1 into 2 portions, largest first onto the lighter one:
    # a(7)->0, b(5)->1, c(4)->1 (5<7), d(3)->0 (7<9), e(1)->0 or 1 (10 vs 9) -> 1
    placement = pack_groups({"a": 7, "b": 5, "c": 4, "d": 3, "e": 1}, 2)
    assert placement == {"a": 0, "b": 1, "c": 1, "d": 0, "e": 1}


def test_groups_stay_whole_and_composition_is_reported(tmp_path):
    sources = ["flan"] * 6 + ["oasst"] * 5 + ["code"] * 4 + ["cot"] * 3
    records = [{"instruction": f"q{i}", "output": f"a{i}", "source": s} for i, s in enumerate(sources)]
    path = write_jsonl(tmp_path / "mix.jsonl", records)
    result = disperse(DisperseConfig(inputs=(str(path),), output_dir=str(tmp_path / "out"), k=2,
                                     method="field", field="source"))
    seen = {}
    for index, portion in enumerate(result.portion_files):
        for line in portion.read_text().splitlines():
            source = json.loads(line)["source"]
            assert seen.setdefault(source, index) == index  # a group never spans two portions
    # flan(6)->0, oasst(5)->1, code(4)->1, cot(3)->0: 9 and 9
    assert seen == {"flan": 0, "oasst": 1, "code": 1, "cot": 0}
    assert result.manifest["counts"] == [9, 9]
    assert result.manifest["portions"][0]["by_group"] == {"flan": 6, "cot": 3}


def test_a_missing_column_names_the_record_and_the_fields(tmp_path):
    records = [{"instruction": "q", "output": "a", "source": "x"}, {"instruction": "q2", "output": "a2"}]
    path = write_jsonl(tmp_path / "mix.jsonl", records)
    with pytest.raises(DtmError, match=r"mix.jsonl:2: record has no field 'source'.*'instruction'"):
        disperse(DisperseConfig(inputs=(str(path),), output_dir=str(tmp_path / "out"), k=2, method="field",
                                field="source"))


def test_fewer_groups_than_portions_is_refused(tmp_path):
    records = [{"instruction": f"q{i}", "output": "a", "source": "only"} for i in range(5)]
    path = write_jsonl(tmp_path / "one.jsonl", records)
    with pytest.raises(DtmError, match="only 1 distinct value"):
        disperse(DisperseConfig(inputs=(str(path),), output_dir=str(tmp_path / "out"), k=2, method="field",
                                field="source"))
