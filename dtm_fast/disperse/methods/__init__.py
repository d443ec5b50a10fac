"""Dispersal methods: one small module each, listed in METHODS.

A method is a function `assign(conversations, config) -> Assignment` that gives every record
(in input order) a portion index in [0, K). Adding a method is one module plus one line here.
"""

from __future__ import annotations

from typing import Callable

from dtm_fast.disperse.methods import field, kmeans, random
from dtm_fast.disperse.methods.assignment import Assignment


METHODS: dict[str, Callable[..., Assignment]] = {
    "random": random.assign,
    "kmeans": kmeans.assign,
    "field": field.assign,
}
