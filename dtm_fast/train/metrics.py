"""Training metrics on disk: one JSON object per logged step in metrics.jsonl (appended as the run
goes, cut back to the checkpoint on resume) and a loss-curve PNG at the end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
        self.path.write_text("".join(json.dumps(record) + "\n" for record in kept))

    def append(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


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
