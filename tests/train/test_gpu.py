"""GPU-only paths: flash-attention with packed rows, bf16 compute. Skipped without CUDA."""

import importlib.util

import pytest
import torch

from tests.train.conftest import make_config, run_trainer

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
needs_flash = pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash-attn")


@needs_cuda
@needs_flash
def test_flash_attention_packed_equals_sdpa_unpacked(tiny_model):
    from transformers import AutoModelForCausalLM

    from dtm_fast.data.chat import IGNORE_INDEX, TokenizedExample
    from dtm_fast.data.packing import collate

    items = [TokenizedExample(list(range(3, 3 + n)), [IGNORE_INDEX] + list(range(4, 3 + n)), str(n)) for n in (9, 14)]
    flash = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16,
                                                 attn_implementation="flash_attention_2").cuda().eval()
    sdpa = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16,
                                                attn_implementation="sdpa").cuda().eval()
    packed = collate(items, [[0, 1]], pad_id=0)
    with torch.no_grad():
        got = flash(input_ids=packed.input_ids.cuda(), position_ids=packed.position_ids.cuda(), use_cache=False).logits
        alone = sdpa(input_ids=collate(items, [[1]], pad_id=0).input_ids.cuda(), use_cache=False).logits
    torch.testing.assert_close(got[0, 9:].float(), alone[0].float(), atol=3e-2, rtol=3e-2)


@needs_cuda
def test_bf16_training_on_cuda_lowers_the_loss(tiny_model, arithmetic_data, tmp_path):
    config = make_config(tiny_model, arithmetic_data, tmp_path / "gpu", mixed_precision="bf16", max_steps=8,
                         learning_rate=3e-3, attention="auto")
    _, result = run_trainer(config)
    assert result.losses[-1] < result.losses[0]
