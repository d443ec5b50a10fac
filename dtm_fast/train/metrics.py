"""Training metrics on disk: one JSON object per logged step in metrics.jsonl (appended as the run
goes, cut back to the checkpoint on resume) and a loss-curve PNG at the end."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from dtm_fast.io.atomic import write_text

logger = logging.getLogger(__name__)


class MetricsLog:
    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def start(self, resumed_step: int) -> None:
        """Keep the records of steps the checkpoint covers; later ones will be trained again."""
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [record for record in self.read() if record["step"] <= resumed_step]
        write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept))

    def append(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """The records, skipping (with a warning) any line that is not one of ours: the curve is a
        report, and a damaged line must not stop a run."""
        if not self.path.is_file():
            return []
        records = []
        for number, line in enumerate(self.path.read_bytes().decode("utf-8", "replace").splitlines(), start=1):
            try:
                record = json.loads(line) if line.strip() else None
            except (json.JSONDecodeError, RecursionError):
                record = "damaged"
            if record is None:
                continue
            if not isinstance(record, dict) or not isinstance(record.get("step"), int) \
                    or not isinstance(record.get("loss"), (int, float)):
                logger.warning("%s:%d: not a metrics record; skipped", self.path, number)
                continue
            records.append(record)
        return records


def plot_loss(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot([r["step"] for r in records], [r["loss"] for r in records], linewidth=1.2)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss (per response token)")
    axis.set_title(title)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
