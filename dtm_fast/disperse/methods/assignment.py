"""What a dispersal method returns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Assignment:
    portion: list[int]  # portion index of each record, in input order
    # the group each record belongs to (its k-means cluster, its field value), reported per portion
    # in the manifest; None where the method has no groups
    group: list[str] | None = None
