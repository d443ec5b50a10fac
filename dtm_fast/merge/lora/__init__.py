"""Merging LoRA sub-models (peft adapter directories) onto their base model.

Each adapter i holds, per targeted linear layer, factors A_i (r_i x in) and B_i (out x r_i) with
scale s_i = alpha_i / r_i (alpha_i / sqrt(r_i) with rslora); its sub-model is W_i = W + s_i B_i A_i.
Three modes (`--lora-mode`), named for what they compute, each a source of the one merge driver:

  materialize     stream each virtual W_i through any merge method into a full checkpoint
                  (materialize.py);
  exact-concat    one adapter of rank sum(r_i) whose product is exactly sum_i c_i s_i B_i A_i
                  (linear weights c_i; adapter_out.py);
  factor-average  the DTM paper code's A = sum c_i A_i, B = sum c_i B_i, an approximation (adapter_out.py).

adapters.py reads and checks the adapters against the base.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dtm_fast.merge.config import MergeConfig
    from dtm_fast.merge.inputs import Inputs
    from dtm_fast.merge.sources import MergeSource

log = logging.getLogger(__name__)


def lora_source(config: "MergeConfig", inputs: "Inputs") -> "MergeSource":
    """The merge source for config.lora_mode, after every adapter is checked."""
    from dtm_fast.merge.lora.adapters import read_adapters

    adapters = read_adapters(config, inputs)
    log.info("merging %d LoRA adapter(s) with --lora-mode %s", len(adapters), config.lora_mode)
    if config.lora_mode == "materialize":
        from dtm_fast.merge.lora.materialize import MaterializeSource

        return MaterializeSource(config, inputs, adapters)
    from dtm_fast.merge.lora.adapter_out import AdapterSource

    return AdapterSource(config, inputs, adapters)
