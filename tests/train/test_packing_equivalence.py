"""A packed row gives every example exactly the logits and loss it gets alone: with position_ids
restarts, no attention mask and no cache, transformers derives block-diagonal attention."""

import pytest
import torch
import torch.nn.functional as F

from dtm_fast.data.chat import IGNORE_INDEX, TokenizedExample
from dtm_fast.data.packing import collate


def examples():
    generator = torch.Generator().manual_seed(0)
    made = []
    for length in (7, 12, 5):
        ids = torch.randint(0, 255, (length,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * 2 + ids[2:]
        made.append(TokenizedExample(ids, labels, f"example-{length}"))
    return made


def load(tiny_model, attention):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation=attention).eval()


def loss_of(model, batch):
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    return logits, F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX,
                                   reduction="sum")


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_equals_unpacked(tiny_model, attention):
    model = load(tiny_model, attention)
    items = examples()
    with torch.no_grad():
        packed_logits, packed_loss = loss_of(model, collate(items, [[0, 1, 2]], pad_id=0))
        offset, separate_loss = 0, 0.0
        for index, item in enumerate(items):
            logits, loss = loss_of(model, collate(items, [[index]], pad_id=0))
            torch.testing.assert_close(packed_logits[0, offset:offset + len(item)], logits[0], atol=1e-5, rtol=1e-5)
            separate_loss += float(loss)
            offset += len(item)
    assert abs(float(packed_loss) - separate_loss) < 1e-4


def test_without_position_restarts_examples_leak_into_each_other(tiny_model):
    """The control: the same packed row with plain positions does not match, so the test above can fail."""
    model = load(tiny_model, "sdpa")
    items = examples()
    batch = collate(items, [[0, 1, 2]], pad_id=0)
    plain_positions = torch.arange(batch.input_ids.shape[1])[None]
    with torch.no_grad():
        leaked = model(input_ids=batch.input_ids, position_ids=plain_positions, use_cache=False).logits
        alone = model(input_ids=collate(items, [[1]], pad_id=0).input_ids, use_cache=False).logits
    second = slice(len(items[0]), len(items[0]) + len(items[1]))
    assert (leaked[0, second] - alone[0]).abs().max() > 1e-2
