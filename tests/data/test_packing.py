"""Packing, row order and collation against hand-checked values."""

import random

from dtm_fast.data.chat import IGNORE_INDEX, TokenizedExample
from dtm_fast.data.packing import RowSchedule, collate, pack_rows


def test_packing_keeps_every_example_once_within_max_length():
    rng = random.Random(1)
    lengths = [rng.randint(20, 400) for _ in range(3000)]
    rows = pack_rows(lengths, 1024, seed=7, packing=True)
    assert sorted(i for row in rows for i in row) == list(range(3000))
    assert all(sum(lengths[i] for i in row) <= 1024 for row in rows)
    share = sum(lengths) / (1024 * len(rows))
    assert share >= 0.95, share


def test_order_is_a_function_of_the_seed():
    lengths = [random.Random(2).randint(5, 50) for _ in range(200)]
    assert pack_rows(lengths, 128, 3, True) == pack_rows(lengths, 128, 3, True)
    assert pack_rows(lengths, 128, 3, True) != pack_rows(lengths, 128, 4, True)
    unpacked = pack_rows(lengths, 128, 3, False)
    assert sorted(unpacked) == [[i] for i in range(200)]


def test_schedule_visits_every_row_once_per_epoch_and_straddles_epochs():
    schedule = RowSchedule(num_rows=10, batch_size=4, seed=0)
    assert schedule.total_steps(epochs=2) == 5
    stream = [row for step in range(5) for row in schedule.rows_for_step(step)]
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    assert stream[:10] != stream[10:]  # each epoch has its own order
    assert RowSchedule(10, 4, 0).rows_for_step(3) == schedule.rows_for_step(3)


def test_collate_restarts_positions_and_never_predicts_across_examples():
    a = TokenizedExample([1, 2, 3], [IGNORE_INDEX, 2, 3], "a")
    b = TokenizedExample([4, 5], [IGNORE_INDEX, 5], "b")
    c = TokenizedExample([6, 7], [IGNORE_INDEX, 7], "c")
    batch = collate([a, b, c], [[0, 1], [2]], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    # position t predicts token t+1 of the same example; 3 -> 4 crosses a boundary and is ignored
    assert batch.targets.tolist() == [[2, 3, -100, 5, -100], [7, -100, -100, -100, -100]]
    assert batch.real_tokens == 7 and batch.padded_tokens == 10
