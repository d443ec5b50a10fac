"""Small instruction data sets in every format."""

from __future__ import annotations

import json
from pathlib import Path

def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return path


def alpaca_records(count: int) -> list[dict]:
    return [{"instruction": f"Question number {i}: what is {i} plus {i}?", "input": "" if i % 3 else "show work",
             "output": f"The answer is {2 * i}.", "source": ["math", "trivia", "code"][i % 3], "id": i}
            for i in range(count)]


def messages_records(count: int, turns: int = 2) -> list[dict]:
    records = []
    for i in range(count):
        messages = [{"role": "system", "content": "Be brief."}]
        for turn in range(turns):
            messages += [{"role": "user", "content": f"record {i} turn {turn} question"},
                         {"role": "assistant", "content": f"record {i} turn {turn} answer ü"}]
        records.append({"messages": messages, "source": f"src{i % 2}"})
    return records


def sharegpt_records(count: int, turns: int = 2) -> list[dict]:
    records = []
    for i in range(count):
        conversation = []
        for turn in range(turns):
            conversation += [{"from": "human", "value": f"hello {i}/{turn}"}, {"from": "gpt", "value": f"hi {i}/{turn}"}]
        records.append({"conversations": conversation, "id": f"sg{i}"})
    return records


def prompt_completion_records(count: int) -> list[dict]:
    return [{"prompt": f"Translate {i} to words", "completion": f"number {i}"} for i in range(count)]
