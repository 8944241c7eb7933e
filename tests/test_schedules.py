"""Batch-size schedules give the intended batch size at given steps; the LR rules scale as stated."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scaling.config import BatchSchedule
from scaling.schedules import batch_size_at, batch_sizes, lr_factor

STEPS = 7500
STEP_32_512 = BatchSchedule(kind="step", steps=((0, 32), (1500, 64), (3000, 128), (4500, 256), (6000, 512)))


@pytest.mark.parametrize("schedule, expected", [
    (BatchSchedule(), {0: 512, 3000: 512, 7499: 512}),
    (BatchSchedule(batch=32), {0: 32, 7499: 32}),
    (BatchSchedule(kind="linear", start=32, end=512), {0: 32, 7499: 512, 2: round(32 + 480 * 2 / 7499),
                                                        3749: round(32 + 480 * 3749 / 7499)}),
    (BatchSchedule(kind="exponential", start=32, end=512), {0: 32, 7499: 512, 1: 32,
                                                             5000: round(32 * 16 ** (5000 / 7499))}),
    (STEP_32_512, {0: 32, 1499: 32, 1500: 64, 2999: 64, 3000: 128, 4500: 256, 5999: 256, 6000: 512, 7499: 512}),
])
def test_schedule_gives_the_intended_batch_size(schedule, expected):
    for step, b in expected.items():
        assert batch_size_at(schedule, step, STEPS, 512) == b, step
    sizes = batch_sizes(schedule, STEPS, 512)
    assert len(sizes) == STEPS and all(sizes[s] == b for s, b in expected.items())


def test_ramps_meet_in_the_middle_as_their_shapes_say():
    lin, exp = BatchSchedule(kind="linear", start=32, end=512), BatchSchedule(kind="exponential", start=32, end=512)
    assert batch_size_at(lin, 50, 101, 512) == 272  # arithmetic mean of 32 and 512
    assert batch_size_at(exp, 50, 101, 512) == 128  # geometric mean
    down = BatchSchedule(kind="linear", start=512, end=32)
    assert batch_size_at(down, 0, 101, 1) == 512 and batch_size_at(down, 100, 101, 1) == 32


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["linear", "exponential"]), a=st.integers(1, 1024), b=st.integers(1, 1024),
       steps=st.integers(1, 3000))
def test_ramps_stay_between_their_ends_and_move_one_way(kind, a, b, steps):
    sizes = batch_sizes(BatchSchedule(kind=kind, start=a, end=b), steps, 7)
    assert sizes.min() >= min(a, b) and sizes.max() <= max(a, b)
    assert sizes[-1] == b and (steps == 1 or sizes[0] == a)
    d = sizes[1:] - sizes[:-1]
    assert (d >= 0).all() if b >= a else (d <= 0).all()


def test_lr_rules():
    assert lr_factor("none", 32, 512) == 1.0
    assert lr_factor("sqrt", 32, 512) == pytest.approx(0.25)
    assert lr_factor("linear", 32, 512) == pytest.approx(1 / 16)
    assert lr_factor("sqrt", 2048, 512) == pytest.approx(2.0) and lr_factor("linear", 512, 512) == 1.0
    assert math.isclose(lr_factor("sqrt", 128, 512) ** 2, lr_factor("linear", 128, 512))
