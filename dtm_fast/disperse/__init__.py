"""Dispersal: split an instruction data set into K portions, one per DTM sub-model.

    from dtm_fast.disperse import DisperseConfig, disperse
    result = disperse(DisperseConfig(inputs=("data.jsonl",), output_dir="portions", k=4))
    result.portion_files, result.manifest

Methods live in `dtm_fast.disperse.methods` (one module each, listed in METHODS).
"""

from dtm_fast.disperse.config import DisperseConfig
from dtm_fast.disperse.pipeline import DisperseResult, disperse, is_current

__all__ = ["DisperseConfig", "DisperseResult", "disperse", "is_current"]
