"""Field dispersal: records grouped by the value of one column (for example the source dataset of a
mix), whole groups packed into K portions as evenly as possible (largest group first onto the
lightest portion), so each sub-model specialises on a few sources."""

from __future__ import annotations

import json
import logging
from collections import Counter

from dtm_fast.disperse.methods.assignment import Assignment
from dtm_fast.errors import DtmError

logger = logging.getLogger(__name__)


def group_label(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)


def pack_groups(sizes: dict[str, int], k: int) -> dict[str, int]:
    """Longest-processing-time packing: group label -> portion index. Ties break on the label and
    the portion index, so the packing is deterministic."""
    loads = [0] * k
    placement = {}
    for label, size in sorted(sizes.items(), key=lambda item: (-item[1], item[0])):
        lightest = min(range(k), key=lambda portion: (loads[portion], portion))
        placement[label] = lightest
        loads[lightest] += size
    return placement


def assign(conversations, config):
    labels = []
    for conversation in conversations:
        if config.field not in conversation.raw:
            raise DtmError(f"{conversation.location}: record has no field {config.field!r} to disperse by; "
                           f"its fields are {sorted(conversation.raw)}")
        labels.append(group_label(conversation.raw[config.field]))
    sizes = Counter(labels)
    if len(sizes) < config.k:
        raise DtmError(f"disperse: field {config.field!r} has only {len(sizes)} distinct value(s) "
                       f"({', '.join(sorted(sizes))}) for K = {config.k} portions; lower K or use another method")
    placement = pack_groups(dict(sizes), config.k)
    portion = [placement[label] for label in labels]
    loads = Counter(portion)
    largest, smallest = max(loads.values()), min(loads.values())
    if largest > 1.5 * smallest:
        logger.warning("field %r packs unevenly: portion sizes range from %d to %d records (one group "
                       "is large); consider --method random or kmeans --balance", config.field, smallest, largest)
    return Assignment(portion, labels)
